"""The hub's role keys and the history of trust roots in its home directory.

    HOME/trust-root.bin          the newest root (what new devices pin at enrolment)
    HOME/roots/root.<N>.bin      every root version, for devices that walk the chain
    HOME/keys/<role>.key         the first key of each role (`hub init`)
    HOME/keys/<role>-<keyid>.key keys added by `hub keys rotate`
    HOME/keys/*.key.revoked      keys removed by `hub keys revoke` (kept, never used)

The hub signs a document of a role with every key it holds that the newest root lists
for that role, so after a rotation it signs with the new key (and the old one, while
that is still listed), and after a revocation never with the revoked one.
`plan_next_root` (pure) makes root N+1 for a change and signs it with the held keys of
root N's and root N+1's root role; it refuses changes the hub could not sign for.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.protocol import SignedEnvelope
from edge_agent.trust.chain import root_document, sign_root, verify_next_root
from edge_agent.trust.root import Role, TrustError, TrustRoot
from hub.errors import Refused
from hub.home.config import HomeError, HubConfig
from ledger.durable import atomic_write
from ledger.errors import KeyFileError
from ledger.signing import PublicKey, SigningKey

ROOT_TTL_NS = 365 * 24 * 3600 * 10**9
REVOKED_SUFFIX = ".revoked"


class KeyChangeRefused(Refused):
    """A rotation or revocation would leave the fleet unable to verify or the hub to sign."""


@dataclass(frozen=True)
class KeyChange:
    """One step of the root chain: what changed and the signed root N+1."""

    role: str
    keyid: str  # the key added (rotate) or removed (revoke)
    root: SignedEnvelope
    version: int
    threshold: int


class Keyring:
    """Role keys held in HOME/keys, judged against the newest root in HOME."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.keys_dir = config.home / "keys"
        self.roots_dir = config.home / "roots"
        self.root: TrustRoot
        self.held: list[SigningKey] = []
        self.reload()

    def reload(self) -> None:
        try:
            data = self.config.trust_root_path.read_bytes()
            self.root = TrustRoot.from_envelope(SignedEnvelope.decode(data, "trust root"),
                                                allow_expired=True)
        except (OSError, ValueError) as exc:
            raise HomeError(f"cannot read the hub's trust root: {exc}") from exc
        held = []
        for path in sorted(self.keys_dir.glob("*.key")):
            with contextlib.suppress(KeyFileError):
                held.append(SigningKey.load(path))
        self.held = held

    def signers(self, role: str) -> list[SigningKey]:
        """The keys the hub signs `role` documents with: the newest `threshold` held keys
        the root lists for the role (a rotation appends, so the new key signs from then on).
        """
        spec = self.root.roles.get(role)
        by_id = {k.keyid: k for k in self.held}
        keys = [by_id[k] for k in spec.keyids if k in by_id] if spec is not None else []
        if spec is None or len(keys) < spec.threshold:
            raise HomeError(f"the hub holds {len(keys)} key(s) of the {role} role listed in "
                            f"trust root version {self.root.version} (HOME/keys); "
                            f"{spec.threshold if spec else 1} needed")
        return keys[len(keys) - spec.threshold:]

    # ------------------------------------------------------------ root history

    def roots(self) -> dict[int, bytes]:
        """Every root version on disk (HOME/roots plus the newest in trust-root.bin)."""
        out: dict[int, bytes] = {}
        for path in self.roots_dir.glob("root.*.bin"):
            with contextlib.suppress(ValueError, OSError):
                out[int(path.name.split(".")[1])] = path.read_bytes()
        out[self.root.version] = self.root.envelope.encode()
        return out

    def store_root(self, data: bytes) -> None:
        """Record a root version on disk; it becomes trust-root.bin if it is the newest."""
        root = TrustRoot.from_envelope(SignedEnvelope.decode(data, "trust root"),
                                       allow_expired=True)
        self.roots_dir.mkdir(parents=True, exist_ok=True)
        current = self.root.envelope.encode()
        current_path = self.roots_dir / f"root.{self.root.version}.bin"
        if not current_path.exists():
            atomic_write(current_path, current)
        atomic_write(self.roots_dir / f"root.{root.version}.bin", data)
        if root.version > self.root.version:
            atomic_write(self.config.trust_root_path, data)
        self.reload()

    # ------------------------------------------------------------ key files

    def new_key_path(self, role: str, key: SigningKey) -> Path:
        return self.keys_dir / f"{role}-{key.keyid}.key"

    def save_new_key(self, role: str, key: SigningKey) -> Path:
        """Write a new role key (0600) before any root names it."""
        path = self.new_key_path(role, key)
        key.save(path)
        os.chmod(path, 0o600)
        return path

    def retire_key_file(self, keyid: str) -> Path | None:
        """Rename the held key file of `keyid` to *.key.revoked; None if not held here."""
        for path in sorted(self.keys_dir.glob("*.key")):
            with contextlib.suppress(KeyFileError):
                if SigningKey.load(path).keyid == keyid:
                    target = path.with_name(path.name + REVOKED_SUFFIX)
                    os.replace(path, target)
                    return target
        return None


def _role_publics(root: TrustRoot) -> dict[str, list[PublicKey]]:
    return {role: [root.keys[k] for k in spec.keyids if k in root.keys]
            for role, spec in root.roles.items()}


WITNESS_ROLE = "witness"
TIMESTAMP_ROLE = "timestamp"


def plan_next_root(
    current: TrustRoot,
    held: Sequence[SigningKey],
    role: str,
    add: SigningKey | None = None,
    remove: str | None = None,
    threshold: int | None = None,
    now: int | None = None,
) -> KeyChange:
    """Root `current.version + 1` with `add` put into `role` or key `remove` taken out.

    Signed by the held keys of the current root role and of the new root role; checked
    with the same chain rule the devices use before it is returned.
    """
    now = now if now is not None else time.time_ns()
    publics = _role_publics(current)
    thresholds = {r: spec.threshold for r, spec in current.roles.items()}
    if role not in current.roles:
        if role != TIMESTAMP_ROLE or add is None:
            raise KeyChangeRefused(
                f"no role {role!r} in the trust root; roles: {', '.join(current.roles)}")
        # A root made before the timestamp role existed gets it by a rotation.
        publics[role], thresholds[role] = [], 1
    if add is not None:
        publics[role].append(add.public)
        changed = add.keyid
    elif remove is not None:
        if remove not in current.roles[role].keyids:
            raise KeyChangeRefused(f"key {remove} is not a {role} key")
        publics[role] = [p for p in publics[role] if p.keyid != remove]
        changed = remove
    else:
        raise KeyChangeRefused("nothing to change")
    if threshold is not None:
        thresholds[role] = threshold
    count = len(publics[role])
    if count == 0:
        raise KeyChangeRefused(
            f"revoking {remove} would leave the {role} role without keys; "
            f"run `hub keys rotate {role}` first, then revoke the old key")
    if not 1 <= thresholds[role] <= count:
        raise KeyChangeRefused(
            f"threshold {thresholds[role]} for the {role} role needs 1 to {count} keys "
            f"(it would have {count})")
    version = current.version + 1
    names = dict(current.names)  # note key names (log origin, witnesses) carry over
    log_names = {names[k] for k in current.roles.get("log", Role((), 1)).keyids if k in names}
    if add is not None and role == "log" and len(log_names) == 1:
        names[add.keyid] = log_names.pop()  # a rotated log key signs under the same origin
    kept = {p.keyid for ps in publics.values() for p in ps}
    names = {k: v for k, v in names.items() if k in kept}
    doc = root_document(publics, thresholds, version, now + ROOT_TTL_NS, names)
    candidates = [*held, *([add] if add is not None else [])]
    listed_new = {p.keyid for p in publics["root"]}
    old_signers = current.role_signers("root", candidates)
    new_signers = [k for k in candidates if k.keyid in listed_new]
    for label, have, need in (
        (f"root {current.version}", old_signers, current.roles["root"].threshold),
        (f"root {version}", new_signers, thresholds["root"]),
    ):
        if len(have) < need:
            raise KeyChangeRefused(
                f"the hub holds {len(have)} of the {need} root keys of {label} needed to "
                "sign the new root")
    held_in_role = [k for k in candidates if k.keyid in {p.keyid for p in publics[role]}]
    # Witnesses hold their own keys: the hub signs nothing in that role.
    if role != WITNESS_ROLE and len(held_in_role) < thresholds[role]:
        raise KeyChangeRefused(
            f"the hub would hold {len(held_in_role)} {role} key(s) but the threshold is "
            f"{thresholds[role]}: it could no longer sign {role} documents")
    envelope = sign_root(doc, [*old_signers, *new_signers])
    try:
        verify_next_root(current, envelope.encode(), now)
    except TrustError as exc:  # a bug here, never a device's problem
        raise KeyChangeRefused(f"the new root does not verify: {exc}") from exc
    return KeyChange(role, changed, envelope, version, thresholds[role])
