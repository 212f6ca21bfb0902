"""`ledger witness`: run a `Witness` (ledger/witness.py) against a hub over NATS.

For each checkpoint the hub publishes on `ledger.checkpoint` (and, at start, the
latest one from `ledger.api.checkpoint`), ask the hub for a consistency proof from the
last checkpoint this witness cosigned, let `Witness.consider` decide, and hand the
cosigned note back on `ledger.cosignature`. A fork stops the witness with both signed
notes printed (`ForkDetected`). An old checkpoint delivered again (JetStream redelivery,
a replay) is checked against the latest cosigned one with a consistency proof from its
size; if it is a prefix it is counted in `stale` and logged at debug level, nothing more.

Log-key rotation: a checkpoint signed by no log key the witness trusts (after `hub keys
rotate log` and `hub keys revoke OLD`) makes it ask the hub for the entries recording
trust roots (`ledger.api.roots`), prove each one's inclusion (in the last checkpoint it
cosigned, or in the new one), and learn the log keys valid at the new checkpoint from
them (ledger/log_keys.py): roots attested by a checkpoint it already trusts, and the
roots after them that their root keys signed. It says so ("log key rotated: ..."). If
it cannot, `LogKeyLost` stops it with the reason: it never falls silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.aio.msg import Msg

from ledger.checkpoint import Checkpoint
from ledger.errors import (
    ForkDetected,
    LogKeyLost,
    NoteError,
    ProofError,
    StaleCheckpoint,
    WitnessError,
)
from ledger.log_keys import LogKeyHistory, RootChainError
from ledger.merkle import TreeHash, verify_inclusion
from ledger.net.remote import CHECKPOINT_SUBJECT, LedgerClient, RemoteError
from ledger.note import parse_note
from ledger.witness import Witness

log = logging.getLogger("ledger.witness")


class WitnessRunner:
    def __init__(
        self,
        witness: Witness,
        client: LedgerClient,
        say: Callable[[str], None],
        tree_hash: TreeHash | None = None,
    ) -> None:
        self.witness = witness
        self.client = client
        self.say = say
        self._th = tree_hash
        self.stale = 0  # old, consistent checkpoints ignored

    async def _tree_hash(self, size: int) -> TreeHash:
        if self._th is None:
            self._th = (await self.client.checkpoint(size)).tree_hash
        return self._th

    async def handle(self, note: bytes) -> bool:
        """Consider one checkpoint note; True if it is (now) cosigned. Raises
        `ForkDetected` on a fork or rollback, `RemoteError` if the hub cannot be asked."""
        try:
            cp = Checkpoint.parse(parse_note(note)[0])
        except NoteError as exc:
            self.say(f"refused: not a checkpoint note: {exc}")
            return False
        latest = self.witness.latest(cp.origin)
        if latest is not None and latest.size == cp.size and latest.root == cp.root:
            return True  # cosigned before
        if self.witness.log_keys(cp.origin) and not self.witness.signed_by_known_key(note):
            await self.follow_rotation(cp, note)
        proof: list[bytes] = []
        if latest is not None and latest.size < cp.size:
            proof = await self.client.consistency(latest.size, cp.size)
        elif latest is not None and cp.size < latest.size:  # old: is it a prefix?
            proof = await self.client.consistency(cp.size, latest.size)
        th = await self._tree_hash(cp.size)
        try:
            cosigned = self.witness.consider(note, proof, th)
        except StaleCheckpoint as exc:
            self.stale += 1
            log.debug("%s", exc)
            return True
        except WitnessError as exc:
            if exc.evidence is not None:
                raise ForkDetected(exc) from exc
            self.say(str(exc))
            return False
        reply = await self.client.submit_cosignature(cosigned)
        stored = ", ".join(reply.get("stored") or []) or "already had it"
        self.say(f"cosigned {cp.origin} tree size {cp.size}; hub stored: {stored}")
        return True

    async def follow_rotation(self, cp: Checkpoint, note: bytes) -> None:
        """Learn the log keys valid at `cp` from the trust roots recorded in the log, or
        raise `LogKeyLost` saying why not (see the module docstring)."""
        origin = cp.origin
        anchor_note = self.witness.latest_note(origin)
        pinned = self.witness.log_keys(origin)
        keys = ", ".join(f"{k.name}+{k.key_hash:08x}" for k in pinned)
        if anchor_note is None:
            raise LogKeyLost(
                f"checkpoint of {origin} tree size {cp.size} is signed by no log key this "
                f"witness trusts ({keys}) and it has cosigned nothing of this log to learn "
                "a rotation from: restart it with the log's new key (the hub's "
                "HOME/log.vkey)")
        anchor = Checkpoint.parse(parse_note(anchor_note)[0])
        th = await self._tree_hash(cp.size)
        try:
            entries = await self.client.roots(cp.size)
            for entry in entries:
                # Each one in the tree the witness cosigned, or in the new one.
                at = anchor if entry.seq < anchor.size else cp
                proof = await self.client.inclusion(entry.seq, at.size)
                verify_inclusion(th, entry.seq, at.size, th.leaf(entry.body), proof, at.root)
                if not entry.hash_matches():
                    raise ProofError(f"entry {entry.seq}: hash does not match its body")
            history = LogKeyHistory.from_entries(pinned, entries, [anchor_note, note],
                                                 follow_chain=True)
            history.open(note)
        except (ProofError, RootChainError, NoteError, RemoteError) as exc:
            raise LogKeyLost(
                f"checkpoint of {origin} tree size {cp.size} is signed by no log key this "
                f"witness trusts ({keys}) and the trust roots recorded in the log do not "
                f"name its key: {exc}") from exc
        learned = self.witness.trust_log_keys(origin, history.verifiers_at(cp.size))
        root = [r for r in history.roots if r.seq < cp.size][-1:]
        where = (f"trust root version {root[0].version} recorded at seq {root[0].seq}"
                 if root else "the trust roots recorded in the log")
        for key in learned:
            self.say(f"log key rotated: now also trusting {key.name}+{key.key_hash:08x} "
                     f"({where})")

    async def once(self) -> bool:
        """Cosign the hub's latest checkpoint (`ledger witness --once`)."""
        latest = await self.client.checkpoint()
        self._th = self._th or latest.tree_hash
        return await self.handle(latest.note)

    async def follow(self, ready: Callable[[], None] = lambda: None) -> None:
        """Cosign every checkpoint the hub publishes, until cancelled or a fork."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_checkpoint(msg: Msg) -> None:
            queue.put_nowait(msg.data)

        # Unsubscribed when this ends, so the supervisor's restart does not add a
        # second subscription (and cosign every checkpoint twice).
        sub = await self.client.subscribe(CHECKPOINT_SUBJECT, on_checkpoint)
        try:
            try:
                await self.once()
            except RemoteError as exc:
                self.say(f"no checkpoint to catch up on yet: {exc}")
            ready()
            while True:
                note = await queue.get()
                try:
                    await self.handle(note)
                except RemoteError as exc:
                    self.say(f"could not check a checkpoint (will take the next one): {exc}")
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
