"""The hub's checkpointer: signs the ledger's tree head, stores it, publishes it.

Every `checkpoint_every_entries` new entries or `checkpoint_every_seconds` (whichever
comes first, and only when the tree grew) the hub signs a C2SP checkpoint of the
current tree size with the log key (key name = the configured `origin`), stores it in
`ledger_checkpoints` (ledger/storage/checkpoint_store.py) and publishes the note on
`ledger.checkpoint` (JetStream stream LEDGER). Witnesses cosign it and send the cosigned
note back on `ledger.cosignature` (hub/log/api.py); `accept_cosignature`
keeps the cosignatures of the witnesses listed in HOME/witnesses.

The log keys are the ones the hub holds (HOME/keys) that its newest trust root lists in
the `log` role, read afresh for every checkpoint. After `hub keys rotate log` there are
two, and each checkpoint carries both signatures: witnesses and auditors still holding
the old vkey keep verifying while they move to the new one (HOME/log.vkey), and
`hub keys revoke OLD` ends the old key's signatures.

It learns that the tree grew from the hub's own `ledger.entry` feed (so the append path
needs no hook) and reads size and root from the database, which is the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from hub.errors import Refused
from hub.home.config import LOG_KEYS_DIR, LOG_VKEY_NAME, HomeError, HubConfig
from hub.keys.keyring import Keyring
from ledger.checkpoint import Checkpoint, sign_checkpoint, tree_hash_extensions
from ledger.durable import atomic_write
from ledger.errors import NoteError
from ledger.net.remote import CHECKPOINT_SUBJECT, ENTRY_SUBJECT
from ledger.note import (
    ALG_COSIGNATURE_V1,
    CosignatureVerifier,
    Signer,
    Verifier,
    open_note,
    parse_note,
    parse_vkey,
)
from ledger.storage.checkpoint_store import CheckpointStore, StoredCheckpoint
from ledger.storage.store import LedgerStore

log = logging.getLogger("hub.checkpoints")

WITNESSES_NAME = "witnesses"


class CosignatureRefused(Refused):
    """A cosigned note the hub will not store; the message says why."""


def load_witness_keys(path: Path) -> list[CosignatureVerifier]:
    """Witness verifier keys, one C2SP vkey per line ('#' starts a comment). A missing
    file means no witnesses; a bad line raises `NoteError` naming it."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    keys = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key = parse_vkey(line)
        if not isinstance(key, CosignatureVerifier):
            raise NoteError(f"{path} line {number}: not a cosignature (type 0x04) key")
        keys.append(key)
    return keys


def log_signer(config: HubConfig) -> Signer:
    """The log's newest note signer (see `log_signers`)."""
    return log_signers(config)[-1]


def log_signers(config: HubConfig) -> list[Signer]:
    """The log's note signers, oldest first: each log-role key of the newest trust root
    that the hub holds, named by the configured origin."""
    keyring = Keyring(config)
    spec = keyring.root.roles.get("log")
    held = {k.keyid: k for k in keyring.held}
    keys = [held[k] for k in spec.keyids if k in held] if spec is not None else []
    if not keys:
        raise HomeError(f"the hub holds no log key listed in trust root version "
                        f"{keyring.root.version} (HOME/keys); it cannot sign checkpoints")
    try:
        return [Signer.from_signing_key(config.origin, key) for key in keys]
    except NoteError as exc:
        raise HomeError(f"origin {config.origin!r} in config.toml cannot name the log key: "
                        f"{exc}") from exc


def write_log_vkey(config: HubConfig) -> Path:
    """HOME/log.vkey := the newest log key's verifier key (after a log-key change), and
    HOME/log-keys/<keyid>.vkey for every log key the hub signs with. Those files are
    never removed: a revoked key's vkey stays for auditors of old checkpoints."""
    path = config.home / LOG_VKEY_NAME
    atomic_write(path, (log_signer(config).vkey() + "\n").encode(), 0o644)
    keyring = Keyring(config)
    spec = keyring.root.roles.get("log")
    for keyid in spec.keyids if spec is not None else ():
        public = keyring.root.keys.get(keyid)
        if public is not None:
            save_log_vkey(config, keyid, Verifier(config.origin, public.raw).vkey())
    return path


def save_log_vkey(config: HubConfig, keyid: str, vkey: str) -> Path:
    """HOME/log-keys/<keyid>.vkey (kept forever; written once)."""
    path = config.home / LOG_KEYS_DIR / f"{keyid}.vkey"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (vkey + "\n").encode(), 0o644)
    return path


def saved_log_vkeys(config: HubConfig) -> dict[str, str]:
    """keyid -> vkey of every log key HOME/log-keys keeps (current and revoked)."""
    out = {}
    for path in sorted((config.home / LOG_KEYS_DIR).glob("*.vkey")):
        with contextlib.suppress(OSError):
            out[path.name.removesuffix(".vkey")] = path.read_text().strip()
    return out


class Checkpointer:
    def __init__(
        self,
        store: LedgerStore,
        signers: Callable[[], Sequence[Signer]],
        every_entries: int = 100,
        every_seconds: float = 10.0,
        witnesses_path: Path | None = None,
    ) -> None:
        if every_entries < 1 or every_seconds <= 0:
            raise ValueError("checkpoint cadence must be at least 1 entry and > 0 seconds")
        self.store = store
        self.checkpoints = CheckpointStore(store)
        self.signers = signers
        self.every_entries = every_entries
        self.every_seconds = every_seconds
        self.witnesses_path = witnesses_path
        self._js: JetStreamContext | None = None
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._due = asyncio.Event()
        self._lock = asyncio.Lock()
        # Whether this process may sign now: with several hub processes only the leader
        # signs (hub.commands.leadership), so a deposed leader adds no checkpoint.
        self.may_sign: Callable[[], bool] = lambda: True
        latest = self.checkpoints.latest()
        self._signed_size = 0 if latest is None else latest.size

    @classmethod
    def from_config(cls, config: HubConfig, store: LedgerStore) -> Checkpointer:
        log_signers(config)  # a home that cannot sign fails now, not at the first checkpoint
        return cls(store, lambda: log_signers(config), config.checkpoint_every_entries,
                   config.checkpoint_every_seconds, config.home / WITNESSES_NAME)

    async def start(self, nc: NATS, js: JetStreamContext) -> None:
        self._js = js
        self._sub = await nc.subscribe(ENTRY_SUBJECT, cb=self._on_entry)
        self._task = asyncio.create_task(self._run(), name="checkpointer")

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Sign what was appended since the last checkpoint, so it is not left unsigned.
        with contextlib.suppress(Exception):
            await self.sign_now()

    async def _on_entry(self, msg: Msg) -> None:
        try:
            seq = int((msg.headers or {})["Ledger-Seq"])
        except (KeyError, ValueError):
            return
        if seq + 1 - self._signed_size >= self.every_entries:
            self._due.set()

    async def hand_over(self) -> None:
        """Stop the signing loop's own task: the caller runs `run()` (e.g. under a
        supervisor that restarts it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """Sign checkpoints when due, until cancelled."""
        await self._run()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), self.every_seconds)
            self._due.clear()
            try:
                await self.sign_now()
            except Exception:  # keep signing later; the ledger itself is unaffected
                log.exception("could not sign a checkpoint")

    async def sign_now(self) -> StoredCheckpoint | None:
        """Sign, store and publish a checkpoint of the current tree if it grew since the
        last one; return the latest checkpoint (None while the ledger is empty)."""
        async with self._lock:
            size = self.store.count()
            latest = self.checkpoints.latest()
            if (latest is not None and latest.size >= size) or not self.may_sign():
                return latest
            if size == 0:
                return None
            root = self.store.root(size)
            signers = self.signers()
            # The tree hash is signed too (a line unless SHA-256): docs/PROTOCOL.md.
            extensions = tree_hash_extensions(self.store.tree_hash.name)
            note = sign_checkpoint(Checkpoint(signers[0].name, size, root, extensions),
                                   *signers)
            self.checkpoints.add(size, root, note)
            self._signed_size = size
            stored = self.checkpoints.get(size)
            log.info("checkpoint signed: tree size %d, root %s", size, root.hex()[:16])
        if self._js is not None:
            with contextlib.suppress(Exception):  # witnesses can also ask the API for it
                await self._js.publish(CHECKPOINT_SUBJECT, note, headers={
                    "Nats-Msg-Id": f"checkpoint.{size}", "Ledger-Tree-Size": str(size)})
        return stored

    def accept_cosignature(self, data: bytes) -> tuple[int, list[str]]:
        """Store the cosignatures in a note a witness sent back. The text must be a
        checkpoint this log signed; each cosignature must come from a witness key listed
        in HOME/witnesses and verify. Returns (tree size, names stored now)."""
        try:
            text, _ = parse_note(data)
            cp = Checkpoint.parse(text)
        except NoteError as exc:
            raise CosignatureRefused(f"not a checkpoint note: {exc}") from exc
        stored = self.checkpoints.get(cp.size)
        if stored is None or parse_note(stored.note)[0] != text:
            raise CosignatureRefused(
                f"the hub signed no such checkpoint (tree size {cp.size}, origin {cp.origin})"
            )
        try:
            witnesses = (load_witness_keys(self.witnesses_path)
                         if self.witnesses_path is not None else [])
        except (NoteError, OSError) as exc:
            raise CosignatureRefused(f"the hub's witness list is unusable: {exc}") from exc
        if not witnesses:
            raise CosignatureRefused(
                "this hub lists no witnesses (add their vkeys to HOME/witnesses)"
            )
        known = {(w.name, w.key_hash) for w in witnesses}
        try:
            note = open_note(data, [*(s.verifier() for s in self.signers()), *witnesses])
        except NoteError as exc:
            raise CosignatureRefused(f"refused: {exc}") from exc
        added = []
        for sig in note.sigs:
            key = (sig.name, sig.key_hash)
            if key in known and self.checkpoints.add_cosignature(cp.size, sig):
                added.append(sig.name)
        if not any((s.name, s.key_hash) in known for s in note.sigs):
            raise CosignatureRefused(
                "no cosignature from a witness listed in HOME/witnesses "
                f"(type 0x{ALG_COSIGNATURE_V1:02x} keys)"
            )
        if added:
            log.info("checkpoint %d cosigned by %s", cp.size, ", ".join(added))
        return cp.size, added
