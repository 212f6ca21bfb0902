"""The hub's role keys and the history of trust roots in its home directory.

    HOME/trust-root.bin          the newest root (what new devices pin at enrolment)
    HOME/roots/root.<N>.bin      every root version, for devices that walk the chain
    HOME/keys/<role>.key         the first key of each role (`hub init`)
    HOME/keys/<role>-<keyid>.key keys added by `hub keys rotate`
    HOME/keys/*.key.revoked      keys removed by `hub keys revoke` (kept, never used)

The hub signs a document of a role with every key it holds that the newest root lists
for that role, so after a rotation it signs with the new key (and the old one, while
that is still listed), and after a revocation never with the revoked one.
`plan_next_root` (pure) makes root N+1 for a change in three steps: `build_next_root`
(the unsigned document), `root_key_signers` + `sign_root` (the held keys of root N's and
root N+1's root role), `verify_change` (the devices' chain rule). The offline path
(`hub keys root prepare|sign|import`, hub/keys/offline.py) uses the same build and
verify with the root keys elsewhere. Changes the hub could not sign for are refused.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.protocol import SignedEnvelope
from edge_agent.trust.chain import root_document, sign_root, verify_next_root
from edge_agent.trust.root import Role, TrustError, TrustRoot
from hub.errors import Refused
from hub.home.config import HomeError, HubConfig
from ledger.durable import atomic_write
from ledger.encoding import canonical_encode
from ledger.errors import KeyFileError
from ledger.signing import PublicKey, SigningKey

ROOT_TTL_NS = 365 * 24 * 3600 * 10**9
REVOKED_SUFFIX = ".revoked"
ROOT_ROLE = "root"
WITNESS_ROLE = "witness"
TIMESTAMP_ROLE = "timestamp"


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


def check_outside_home(home: Path, dest: Path) -> None:
    """Refuse a directory for the offline root key inside the hub's home."""
    home, dest = home.resolve(), dest.resolve()
    if dest == home or home in dest.parents:
        raise HomeError(f"{dest} is inside the hub's home: choose a directory on the "
                        "medium the root key goes to (a USB stick, the offline machine)")


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

    def move_root_keys(self, dest: Path) -> list[Path]:
        """Move the held keys of the current root role out of HOME/keys into `dest`
        (0600 files, written and read back before the originals go), with a copy of the
        current root (`dest`/trust-root.N.bin): the hub then runs without the root key
        (`hub keys root export-offline`, `hub init --offline-root`)."""
        check_outside_home(self.config.home, dest)
        dest = dest.resolve()
        listed = set(self.root.roles[ROOT_ROLE].keyids) if ROOT_ROLE in self.root.roles \
            else set()
        moving = []
        for path in sorted(self.keys_dir.glob("*.key")):
            with contextlib.suppress(KeyFileError):
                key = SigningKey.load(path)
                if key.keyid in listed:
                    moving.append((path, key))
        if not moving:
            raise HomeError(f"{self.keys_dir} holds no key of the root role of trust root "
                            f"version {self.root.version}: is it offline already?")
        dest.mkdir(parents=True, exist_ok=True)
        moved = []
        # A copy of the root they sign from: `hub keys root sign --root` pins it.
        atomic_write(dest / f"trust-root.{self.root.version}.bin", self.root.envelope.encode(),
                     0o644)
        for _, key in moving:
            target = dest / f"root-{key.keyid}.key"
            if target.exists():
                raise HomeError(f"{target} exists already; not overwriting a key file")
            # On disk (fsync) before the original is deleted: the same hex seed format
            # as SigningKey.save.
            atomic_write(target, (key.private_raw().hex() + "\n").encode(), 0o600)
            if SigningKey.load(target).keyid != key.keyid:  # read back before deleting
                raise HomeError(f"{target} does not read back as key {key.keyid}")
            moved.append(target)
        for path, _ in moving:
            path.unlink()
        self.reload()
        return moved

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




@dataclass(frozen=True)
class NextRoot:
    """Root N+1 before anyone signed it: the document and the one change it makes."""

    role: str
    keyid: str  # the key added (rotate) or removed (revoke)
    added: bool
    document: dict[str, Any]
    version: int
    threshold: int  # the role's threshold in root N+1

    @property
    def signed(self) -> bytes:
        """The canonical bytes the root keys sign (domain `root`)."""
        return canonical_encode(self.document)


def build_next_root(
    current: TrustRoot,
    role: str,
    add: PublicKey | None = None,
    remove: str | None = None,
    threshold: int | None = None,
    now: int | None = None,
) -> NextRoot:
    """The unsigned root `current.version + 1` with `add` put into `role` or key `remove`
    taken out; refuses a change that leaves a role without keys or a threshold above its
    key count."""
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
        if add.keyid in current.keys:
            raise KeyChangeRefused(f"key {add.keyid} is already in the trust root")
        publics[role].append(add)
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
    return NextRoot(role, changed, add is not None, doc, version, thresholds[role])


def root_key_signers(current: TrustRoot, document: dict[str, Any],
                     candidates: Sequence[SigningKey]) -> list[SigningKey]:
    """Those of `candidates` that sign root N+1 (`document`): root N's root keys and
    N+1's; refuses when either threshold cannot be met."""
    listed_new = set(document["roles"]["root"]["keyids"])
    old_signers = current.role_signers("root", list(candidates))
    new_signers = [k for k in candidates if k.keyid in listed_new]
    version = document["version"]
    for label, have, need in (
        (f"root {current.version}", old_signers, current.roles["root"].threshold),
        (f"root {version}", new_signers, document["roles"]["root"]["threshold"]),
    ):
        if len(have) < need:
            raise KeyChangeRefused(
                f"the hub holds {len(have)} of the {need} root keys of {label} needed to "
                "sign the new root")
    return [*old_signers, *new_signers]


def check_hub_can_sign(document: dict[str, Any], held: Sequence[SigningKey], role: str) -> None:
    """Refuse root N+1 (`document`) if the hub would hold fewer keys of `role` than its
    threshold: it could no longer sign that role's documents. The root role is signed
    wherever its keys are (possibly offline); witnesses hold their own keys."""
    if role in (ROOT_ROLE, WITNESS_ROLE):
        return
    spec = document["roles"][role]
    have = {k.keyid for k in held}
    count = len([k for k in spec["keyids"] if k in have])
    if count < spec["threshold"]:
        raise KeyChangeRefused(
            f"the hub would hold {count} {role} key(s) but the threshold is "
            f"{spec['threshold']}: it could no longer sign {role} documents")


def verify_change(current: TrustRoot, planned: NextRoot, envelope: SignedEnvelope,
                  now: int | None = None) -> KeyChange:
    """The signed root N+1 checked with the chain rule devices use (both root key
    thresholds, version N+1)."""
    try:
        verify_next_root(current, envelope.encode(), now)
    except TrustError as exc:
        raise KeyChangeRefused(f"the new root does not verify: {exc}") from exc
    return KeyChange(planned.role, planned.keyid, envelope, planned.version, planned.threshold)


def plan_next_root(
    current: TrustRoot,
    held: Sequence[SigningKey],
    role: str,
    add: SigningKey | None = None,
    remove: str | None = None,
    threshold: int | None = None,
    now: int | None = None,
) -> KeyChange:
    """Root `current.version + 1` with `add` put into `role` or key `remove` taken out,
    made online: build, sign with the held keys of the current and the new root role,
    verify with the same chain rule the devices use. The offline path
    (hub/keys/offline.py) builds the same document and signs it elsewhere."""
    planned = build_next_root(current, role, add.public if add is not None else None,
                              remove, threshold, now)
    candidates = [*held, *([add] if add is not None else [])]
    change = sign_next_root(current, planned, candidates, now)
    # The role's own keys: never without, if the hub is to sign for it. Witnesses hold
    # their own keys: the hub signs nothing in that role.
    check_hub_can_sign(planned.document, candidates, role)
    return change


def sign_next_root(current: TrustRoot, planned: NextRoot, candidates: Sequence[SigningKey],
                   now: int | None = None) -> KeyChange:
    """Root N+1 signed online with the held root keys of root N and N+1, then verified
    with the devices' chain rule."""
    signers = root_key_signers(current, planned.document, candidates)
    return verify_change(current, planned, sign_root(planned.document, signers), now)
