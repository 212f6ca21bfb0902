"""Trust roots that add or remove a witness (pure: no HOME, no NATS, no database).

`build_witness_root` / `build_witness_removal` make the unsigned root N+1, with every
refusal of the operation; `hub witness add|remove` signs it with the root keys the hub
holds (`plan_witness_root` / `plan_witness_removal`), `hub keys root prepare
--add-witness|--remove-witness` (hub/keys/offline.py) has it signed on the offline
machine. hub/keys/witnesses.py records it, either way. See that module for the rules.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from edge_agent.trust.chain import root_document
from edge_agent.trust.root import TrustRoot
from hub.keys.keyring import (
    ROOT_TTL_NS,
    WITNESS_ROLE,
    KeyChange,
    KeyChangeRefused,
    NextRoot,
    build_next_root,
    sign_next_root,
)
from ledger.errors import NoteError
from ledger.note import CosignatureVerifier, parse_vkey, valid_key_name
from ledger.signing import PublicKey, SigningKey


def parse_witness_key(name: str, pubkey: str) -> PublicKey:
    """A witness public key from 64 hex digits, or from its cosignature vkey (whose name
    must then be `name`)."""
    if not valid_key_name(name):
        raise KeyChangeRefused(f"witness name {name!r} is not a valid C2SP key name "
                               "(no spaces, no '+')")
    text = pubkey.strip()
    if "+" in text:
        try:
            vkey = parse_vkey(text)
        except NoteError as exc:
            raise KeyChangeRefused(f"--pubkey: {exc}") from exc
        if not isinstance(vkey, CosignatureVerifier):
            raise KeyChangeRefused("--pubkey: not a cosignature (type 0x04) vkey")
        if vkey.name != name:
            raise KeyChangeRefused(f"--pubkey names witness {vkey.name!r}, not {name!r}")
        return PublicKey(vkey.public_key)
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise KeyChangeRefused("--pubkey must be 64 hex digits or a witness vkey") from exc
    if len(raw) != 32:
        raise KeyChangeRefused("--pubkey must be a 32-byte Ed25519 public key (64 hex digits)")
    return PublicKey(raw)


def build_witness_root(
    current: TrustRoot,
    name: str,
    public: PublicKey,
    origin: str,
    threshold: int | None = None,
    now: int | None = None,
) -> NextRoot:
    """The unsigned root `current.version + 1` with witness `name` (key `public`) added:
    one document for `hub witness add` (signed here) and `hub keys root prepare
    --add-witness` (signed offline)."""
    now = now if now is not None else time.time_ns()
    if public.keyid in current.keys:
        raise KeyChangeRefused(f"key {public.keyid} is already in the trust root")
    if name in {current.names.get(k) for k in
                (current.roles[WITNESS_ROLE].keyids if WITNESS_ROLE in current.roles else ())}:
        raise KeyChangeRefused(f"a witness named {name!r} is already in the trust root")
    if not valid_key_name(origin):
        raise KeyChangeRefused(f"origin {origin!r} is not a valid C2SP key name")
    publics = {role: [current.keys[k] for k in spec.keyids if k in current.keys]
               for role, spec in current.roles.items()}
    thresholds = {role: spec.threshold for role, spec in current.roles.items()}
    publics.setdefault(WITNESS_ROLE, []).append(public)
    thresholds[WITNESS_ROLE] = threshold if threshold is not None else thresholds.get(
        WITNESS_ROLE, 1)
    count = len(publics[WITNESS_ROLE])
    if not 1 <= thresholds[WITNESS_ROLE] <= count:
        raise KeyChangeRefused(f"threshold {thresholds[WITNESS_ROLE]} for the witness role "
                               f"needs 1 to {count} keys")
    names = dict(current.names)
    names[public.keyid] = name
    for keyid in current.roles["log"].keyids if "log" in current.roles else ():
        names.setdefault(keyid, origin)
    version = current.version + 1
    doc = root_document(publics, thresholds, version, now + ROOT_TTL_NS, names)
    return NextRoot(WITNESS_ROLE, public.keyid, True, doc, version, thresholds[WITNESS_ROLE])


def plan_witness_root(
    current: TrustRoot,
    held: Sequence[SigningKey],
    name: str,
    public: PublicKey,
    origin: str,
    threshold: int | None = None,
    now: int | None = None,
) -> KeyChange:
    """Root `current.version + 1` with witness `name` (key `public`) added, signed with
    the root keys the hub holds."""
    planned = build_witness_root(current, name, public, origin, threshold, now)
    return sign_next_root(current, planned, held, now)


def witness_keyid(current: TrustRoot, name: str) -> str:
    """The key id of the witness named `name` in `current`, or `KeyChangeRefused`."""
    listed = current.roles[WITNESS_ROLE].keyids if WITNESS_ROLE in current.roles else ()
    for keyid in listed:
        if current.names.get(keyid) == name:
            return keyid
    known = ", ".join(sorted(current.names[k] for k in listed if k in current.names))
    raise KeyChangeRefused(f"no witness named {name!r} in trust root version "
                           f"{current.version} (witnesses: {known or 'none'})")


def build_witness_removal(
    current: TrustRoot,
    name: str,
    threshold: int | None = None,
    now: int | None = None,
) -> NextRoot:
    """The unsigned root `current.version + 1` without witness `name` (`hub witness
    remove` signs it here, `hub keys root prepare --remove-witness` offline)."""
    keyid = witness_keyid(current, name)
    role = current.roles[WITNESS_ROLE]
    remaining = len(role.keyids) - 1
    if remaining == 0:
        raise KeyChangeRefused(
            f"{name!r} is the only witness: without one, devices running with "
            "--require-inclusion could install nothing; add its replacement first "
            "(`hub witness add`), then remove it")
    if threshold is None and role.threshold > remaining:
        raise KeyChangeRefused(
            f"devices require {role.threshold} cosignatures and {remaining} witness(es) "
            f"would be left; give --threshold 1..{remaining} to lower it, or add a "
            "witness first")
    return build_next_root(current, WITNESS_ROLE, remove=keyid, threshold=threshold,
                           now=now)


def plan_witness_removal(
    current: TrustRoot,
    held: Sequence[SigningKey],
    name: str,
    threshold: int | None = None,
    now: int | None = None,
) -> KeyChange:
    """Root `current.version + 1` without witness `name`, signed with the root keys the
    hub holds."""
    return sign_next_root(current, build_witness_removal(current, name, threshold, now),
                          held, now)


def witness_vkey(name: str, public: PublicKey) -> str:
    return CosignatureVerifier(name, public.raw).vkey()
