"""`ledger witness`: run a `Witness` (ledger/witness.py) against a hub over NATS.

For each checkpoint the hub publishes on `ledger.checkpoint` (and, at start, the
latest one from `ledger.api.checkpoint`), ask the hub for a consistency proof from the
last checkpoint this witness cosigned, let `Witness.consider` decide, and hand the
cosigned note back on `ledger.cosignature`. A fork stops the witness with both signed
notes printed (`ForkDetected`). An old checkpoint delivered again (JetStream redelivery,
a replay) is checked against the latest cosigned one with a consistency proof from its
size; if it is a prefix it is counted in `stale` and logged at debug level, nothing more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.msg import Msg

from ledger.checkpoint import Checkpoint
from ledger.errors import ForkDetected, NoteError, StaleCheckpoint, WitnessError
from ledger.merkle import TreeHash
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

        await self.client.subscribe(CHECKPOINT_SUBJECT, on_checkpoint)
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
