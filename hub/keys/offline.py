"""The offline root key: root N+1 prepared on the hub, signed elsewhere, imported back.

A *root signing request* is a JSON file that carries everything the offline machine
needs and nothing it must trust blindly:

    {"type": "fleetledger/root-signing-request", "format": 1,
     "version": N+1, "previous_version": N,
     "previous_root": HEX,   root N's signed envelope (it vouches for itself)
     "signed": HEX,          root N+1's canonical document bytes: what the root keys sign
     "digest": HEX,          BLAKE3 of `signed`, to compare between the two machines
     "signatures": [{"keyid": ..., "sig": HEX}, ...],
     "change": {...}}        what `hub keys root prepare` was asked (informative only)

`hub keys root prepare` (on the hub: `prepare_request`) builds root N+1 exactly as the
online path would (hub.keys.keyring.build_next_root; a rotated online role's new key is
made and kept in HOME/keys, the root role's new key comes as a public key; a witness
added or removed: hub.keys.witness_roots, as `hub witness add|remove`) and writes the
request with no signature. `hub keys root sign` (`sign_request`, pure: no HOME, no NATS,
no database) shows what changes from root N to N+1 as decoded from the bytes themselves,
refuses a request that does not parse, is not version N+1, has expired, carries a
signature that no longer verifies (the document changed after someone signed) or already
carries this key's signature, and adds one signature (domain `root`). Root keys sign in
turn until both thresholds, root N's and root N+1's, are met (`threshold_status`).
`hub keys root import` hands the signed root to the hub, which checks it with the
devices' chain rule (`read_signed_root`) and records and publishes it like an online
rotation (hub.keys.commands), a witness change like `hub witness add|remove`
(hub.keys.witnesses: the same event, HOME/witnesses, the checkpointer's cosigners).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from edge_agent.protocol import ProtocolError, Signature, SignedEnvelope
from edge_agent.protocol.documents import DOMAIN_ROOT
from edge_agent.trust.chain import verify_next_root
from edge_agent.trust.root import TrustError, TrustRoot
from hub.errors import Refused
from hub.keys.keyring import (
    ROOT_ROLE,
    WITNESS_ROLE,
    KeyChange,
    KeyChangeRefused,
    NextRoot,
    build_next_root,
    check_hub_can_sign,
)
from hub.keys.witness_roots import build_witness_removal, build_witness_root
from ledger.signing import PublicKey, SigningKey

REQUEST_TYPE = "fleetledger/root-signing-request"
REQUEST_FORMAT = 1

OFFLINE_HINT = (
    "the root key is offline (not in HOME/keys): make trust root {version} with "
    "`hub keys root prepare {args} --out root-{version}.json`, sign it on the offline "
    "machine with `hub keys root sign root-{version}.json --key ROOT_KEY`, then "
    "`hub keys root import root-{version}.json` (docs/SECURITY.md, \"Keeping the root "
    "key offline\")")


class RootRequestError(Refused):
    """A root signing request that cannot be signed or imported as it is (exit 1)."""


@dataclass(frozen=True)
class RootRequest:
    previous: bytes  # root N's signed envelope
    signed: bytes  # root N+1's canonical document bytes
    signatures: tuple[Signature, ...] = ()
    change: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return blake3.blake3(self.signed).hexdigest()

    def envelope(self) -> SignedEnvelope:
        return SignedEnvelope(self.signed, self.signatures)

    def previous_root(self) -> TrustRoot:
        """Root N, which must vouch for itself."""
        try:
            envelope = SignedEnvelope.decode(self.previous, "previous root")
            return TrustRoot.from_envelope(envelope, allow_expired=True)
        except (ProtocolError, TrustError) as exc:
            raise RootRequestError(f"the request's previous root is not valid: {exc}") from exc

    def next_root(self) -> TrustRoot:
        """Root N+1 as decoded from `signed`, signatures not judged."""
        try:
            return TrustRoot.parse_unverified(self.envelope())
        except TrustError as exc:
            raise RootRequestError(f"the request's new root does not parse: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        previous, new = self.previous_root(), self.next_root()
        return {"type": REQUEST_TYPE, "format": REQUEST_FORMAT, "version": new.version,
                "previous_version": previous.version, "previous_root": self.previous.hex(),
                "previous_digest": blake3.blake3(self.previous).hexdigest(),
                "signed": self.signed.hex(), "digest": self.digest,
                "signatures": [{"keyid": s.keyid, "sig": s.sig.hex()}
                               for s in self.signatures],
                "change": self.change}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def loads(cls, text: str) -> RootRequest:
        """A request from its file; `RootRequestError` naming what is wrong."""
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise RootRequestError(f"not a root signing request (not JSON: {exc})") from exc
        if not isinstance(doc, dict) or doc.get("type") != REQUEST_TYPE:
            raise RootRequestError(f"not a root signing request (type is not {REQUEST_TYPE!r})")
        if doc.get("format") != REQUEST_FORMAT:
            raise RootRequestError(f"root signing request format {doc.get('format')!r}: this "
                                   f"version reads format {REQUEST_FORMAT}")
        try:
            sigs = tuple(Signature(str(s["keyid"]), bytes.fromhex(s["sig"]))
                         for s in doc["signatures"])
            request = cls(bytes.fromhex(doc["previous_root"]), bytes.fromhex(doc["signed"]),
                          sigs, dict(doc.get("change") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise RootRequestError(f"root signing request is malformed: {exc!r}") from exc
        if doc.get("digest") != request.digest:
            raise RootRequestError("the request's digest does not match its document: it was "
                                   "changed (or damaged) after `hub keys root prepare`")
        return request


# ---------------------------------------------------------------- review


def review(previous: TrustRoot, new: TrustRoot) -> dict[str, Any]:
    """What root N+1 changes from root N, role by role, from the documents themselves."""
    roles = []
    for role in sorted({*previous.roles, *new.roles}):
        old_ids = previous.roles[role].keyids if role in previous.roles else ()
        new_ids = new.roles[role].keyids if role in new.roles else ()
        roles.append({
            "role": role,
            "keyids": list(new_ids),
            "added": [k for k in new_ids if k not in old_ids],
            "removed": [k for k in old_ids if k not in new_ids],
            "threshold": new.roles[role].threshold if role in new.roles else None,
            "previous_threshold": (previous.roles[role].threshold
                                   if role in previous.roles else None),
            # A removed key's name as root N gave it (a witness's, in the review).
            "names": {**{k: previous.names[k] for k in old_ids
                         if k not in new_ids and k in previous.names},
                      **{k: new.names[k] for k in new_ids if k in new.names}},
        })
    return {"version": new.version, "previous_version": previous.version,
            "expires": new.expires, "roles": roles,
            "changed": [r["role"] for r in roles
                        if r["added"] or r["removed"]
                        or r["threshold"] != r["previous_threshold"]]}


def threshold_status(previous: TrustRoot, new: TrustRoot,
                     signatures: Sequence[Signature], signed: bytes) -> dict[str, Any]:
    """Valid root-key signatures so far against both thresholds the chain needs."""
    def valid(root: TrustRoot) -> list[str]:
        ids = root.roles[ROOT_ROLE].keyids
        return sorted({s.keyid for s in signatures if s.keyid in ids
                       and root.keys[s.keyid].verify(DOMAIN_ROOT, signed, s.sig)})

    old, new_ids = valid(previous), valid(new)
    old_need = previous.roles[ROOT_ROLE].threshold
    new_need = new.roles[ROOT_ROLE].threshold if ROOT_ROLE in new.roles else 1
    return {"previous": {"version": previous.version, "signed_by": old,
                         "threshold": old_need},
            "new": {"version": new.version, "signed_by": new_ids, "threshold": new_need},
            "complete": len(old) >= old_need and len(new_ids) >= new_need}


# ---------------------------------------------------------------- signing (offline)


def sign_request(request: RootRequest, key: SigningKey, now: int | None = None,
                 pinned: bytes | None = None) -> RootRequest:
    """`request` with `key`'s signature added, after every check a person signing a
    root should want. `pinned`: a copy of root N the signer kept (then the request's
    root N must be exactly it)."""
    now = now if now is not None else time.time_ns()
    previous, new = request.previous_root(), request.next_root()
    if pinned is not None and pinned != request.previous:
        pinned_version = _peek_version(pinned)
        raise RootRequestError(
            f"the request builds on a root {previous.version} that is not the root you "
            f"pinned (version {pinned_version}, --root): refusing to sign")
    if new.version != previous.version + 1:
        raise RootRequestError(
            f"the new root has version {new.version}, not {previous.version + 1}: a root "
            f"must follow root {previous.version} by exactly one version")
    if new.expired(now):
        raise RootRequestError(f"root {new.version} has already expired; prepare it again")
    if ROOT_ROLE not in new.roles:
        raise RootRequestError(f"root {new.version} has no root role")
    root_ids = {*previous.roles[ROOT_ROLE].keyids, *new.roles[ROOT_ROLE].keyids}
    if key.keyid not in root_ids:
        raise RootRequestError(
            f"key {key.keyid} is not a root key of root {previous.version} or root "
            f"{new.version} (their root keys: {', '.join(sorted(root_ids))})")
    publics = {**previous.keys, **new.keys}
    for sig in request.signatures:
        public = publics.get(sig.keyid) if sig.keyid in root_ids else None
        if public is None or not public.verify(DOMAIN_ROOT, request.signed, sig.sig):
            raise RootRequestError(
                f"the signature of key {sig.keyid} does not verify: the root was changed "
                "after it was signed (or the signature is not a root key's); prepare it "
                "again")
    if any(s.keyid == key.keyid for s in request.signatures):
        raise RootRequestError(f"key {key.keyid} has already signed root {new.version}")
    signature = Signature(key.keyid, key.sign(DOMAIN_ROOT, request.signed))
    return RootRequest(request.previous, request.signed, (*request.signatures, signature),
                       request.change)


def _peek_version(data: bytes) -> int | str:
    try:
        version = SignedEnvelope.decode(data, "root").document("root").get("version")
    except ProtocolError:
        return "unreadable"
    return version if isinstance(version, int) else "unreadable"


# ---------------------------------------------------------------- the hub's side


def prepare_request(current: TrustRoot, held: Sequence[SigningKey], *,
                    rotate: str | None = None, revoke: str | None = None,
                    add_witness: tuple[str, PublicKey] | None = None,
                    remove_witness: str | None = None, origin: str = "",
                    threshold: int | None = None, pubkey: PublicKey | None = None,
                    now: int | None = None) -> tuple[RootRequest, SigningKey | None]:
    """Root N+1 for one change, unsigned, and the new role key the hub must keep (None
    for the root role, whose new key was made offline and comes as `pubkey`, for a
    revocation and for a witness, whose key is its own). `add_witness`: (name, key),
    `origin` the hub's (it names the log key). Refuses what the online path refuses,
    with the same build functions."""
    given = [c for c in (rotate, revoke, add_witness, remove_witness) if c is not None]
    if len(given) != 1:
        raise KeyChangeRefused("give one change: --rotate ROLE, --revoke KEYID, "
                               "--add-witness NAME or --remove-witness NAME")
    new_key: SigningKey | None = None
    if add_witness is not None or remove_witness is not None:
        # The witness's own key: nothing for the hub to make, keep or sign with.
        if add_witness is not None:
            name = add_witness[0]
            planned = build_witness_root(current, name, add_witness[1], origin, threshold,
                                         now)
        else:
            assert remove_witness is not None
            name = remove_witness
            planned = build_witness_removal(current, name, threshold, now)
        change = {"action": "add-witness" if planned.added else "remove-witness",
                  "role": planned.role, "keyid": planned.keyid,
                  "threshold": planned.threshold, "name": name}
        return RootRequest(current.envelope.encode(), planned.signed, (), change), None
    if rotate is not None:
        if rotate == WITNESS_ROLE:
            raise KeyChangeRefused("witness keys are the witnesses' own: see "
                                   "--add-witness NAME --pubkey KEY")
        if rotate == ROOT_ROLE:
            if pubkey is None:
                raise KeyChangeRefused(
                    "a new root key is made on the offline machine: run `hub keys root "
                    "keygen --out NEW_ROOT_KEY` there and pass its public key with --pubkey")
            public = pubkey
        else:
            if pubkey is not None:
                raise KeyChangeRefused(f"--pubkey is for the root role; the hub makes and "
                                       f"keeps the new {rotate} key")
            new_key = SigningKey.generate()
            public = new_key.public
        planned = build_next_root(current, rotate, add=public, threshold=threshold, now=now)
        check_hub_can_sign(planned.document, [*held, *([new_key] if new_key else [])],
                           rotate)
    else:
        assert revoke is not None
        roles = [r for r, spec in current.roles.items() if revoke in spec.keyids]
        if not roles:
            raise KeyChangeRefused(f"key {revoke} is in no role of trust root version "
                                   f"{current.version}; see `hub keys show`")
        if roles[0] == WITNESS_ROLE:
            name = current.names.get(revoke, "NAME")
            raise KeyChangeRefused(f"{revoke} is a witness key: use --remove-witness {name}")
        planned = build_next_root(current, roles[0], remove=revoke, threshold=threshold,
                                  now=now)
        check_hub_can_sign(planned.document, [k for k in held if k.keyid != revoke],
                           roles[0])
    change = {"action": "rotate" if planned.added else "revoke", "role": planned.role,
              "keyid": planned.keyid, "threshold": planned.threshold}
    return RootRequest(current.envelope.encode(), planned.signed, (), change), new_key


def read_signed_root(current: TrustRoot, data: bytes, held: Sequence[SigningKey],
                     now: int | None = None) -> tuple[NextRoot, KeyChange]:
    """Root N+1 brought back from the offline machine, checked as a device checks it
    (version N+1, a threshold of root N's and of its own root keys), unexpired, making
    one key change the hub can live with (it holds the keys to sign every online role)."""
    now = now if now is not None else time.time_ns()
    try:
        new = verify_next_root(current, data, now)
    except TrustError as exc:
        raise KeyChangeRefused(f"root refused: {exc}") from exc
    if new.expired(now):
        raise KeyChangeRefused(f"root refused: root {new.version} has expired; prepare it "
                               "again")
    changes = review(current, new)
    changed = [r for r in changes["roles"] if r["role"] in changes["changed"]]
    one_key = (len(changed) == 1
               and len(changed[0]["added"]) + len(changed[0]["removed"]) == 1)
    if not one_key:
        raise KeyChangeRefused(
            f"root refused: root {new.version} changes {len(changed)} role(s) "
            f"({', '.join(r['role'] for r in changed) or 'none'}); import takes a root "
            "from `hub keys root prepare`: one key added to or removed from one role")
    entry = changed[0]
    role = str(entry["role"])
    added = bool(entry["added"])
    keyid = str(entry["added"][0] if added else entry["removed"][0])
    if role == WITNESS_ROLE:
        if role not in new.roles:
            raise KeyChangeRefused(f"root refused: root {new.version} removes the last "
                                   "witness; add its replacement first")
        if added and not new.names.get(keyid):
            raise KeyChangeRefused(f"root refused: root {new.version} adds witness key "
                                   f"{keyid} without a name")
    elif added and role != ROOT_ROLE and keyid not in {k.keyid for k in held}:
        raise KeyChangeRefused(
            f"root refused: it adds {role} key {keyid}, which this hub does not hold "
            "(HOME/keys): prepare the root on this hub (`hub keys root prepare`)")
    document = new.envelope.document("trust root")
    check_hub_can_sign(document, [k for k in held if added or k.keyid != keyid], role)
    planned = NextRoot(role, keyid, added, document, new.version, new.roles[role].threshold)
    return planned, KeyChange(role, keyid, new.envelope, new.version, planned.threshold)
