"""Publish transparency bundles: for each release, once a checkpoint covering its
`model.released` (or `model.resigned`) entry carries the trust root's witness threshold
of cosignatures, the proof bundle of that entry in that checkpoint (ledger/bundle.py)
goes into the KV bucket `transparency` under `<name>.<version>`, where agents that run
with `--require-inclusion` fetch it (edge_agent/trust/inclusion.py).

`sync(size)` runs after every stored cosignature (hub/log/api.py calls it) and once at
hub start for the latest checkpoint. A bundle is written once per entry while its
checkpoint stays signed by a live log key; a newer checkpoint does not re-publish it (a
re-signed manifest is a new entry and is). After a log-key revocation the bundles whose
checkpoint only the revoked key signed are re-published against the newest witnessed
checkpoint, so `--require-inclusion` devices can still install (or roll back to) every
live release.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from edge_agent.errors import InclusionPending, InclusionRefused
from edge_agent.protocol.names import TRANSPARENCY_BUCKET, transparency_key
from edge_agent.trust.inclusion import (
    RELEASE_KINDS,
    transparency_keys,
)
from edge_agent.trust.root import TrustRoot
from ledger.checkpoint import open_checkpoint
from ledger.entry import Entry
from ledger.errors import NoteError
from ledger.storage import query
from ledger.storage.bundles import make_bundle_at
from ledger.storage.checkpoint_store import CheckpointStore, StoredCheckpoint
from ledger.storage.store import LedgerStore

log = logging.getLogger("hub.transparency")


def witnessed_enough(root: TrustRoot, checkpoint: StoredCheckpoint) -> bool:
    """Whether `checkpoint` has the root's witness threshold of cosignatures from distinct
    witness keys of the root (the hub checked each signature before storing it)."""
    try:
        keys = transparency_keys(root)
    except (InclusionPending, InclusionRefused):
        return False
    listed = {(w.name, w.key_hash) for w in keys.witnesses}
    got = {(s.name, s.key_hash) for s in checkpoint.cosignatures} & listed
    return len(got) >= keys.threshold


class TransparencyPublisher:
    def __init__(self, store: LedgerStore, checkpoints: CheckpointStore,
                 root: Callable[[], TrustRoot], js: JetStreamContext,
                 replicas: int = 1) -> None:
        self.store = store
        self.replicas = replicas  # of the bucket, when this makes it
        self.checkpoints = checkpoints
        self.root = root
        self.js = js
        # KV key -> (seq of the entry published, tree size of its checkpoint)
        self.published: dict[str, tuple[int, int]] = {}
        self._lock = asyncio.Lock()

    def _signed_by_live_key(self, root: TrustRoot, size: int) -> bool:
        """Whether the checkpoint of `size` is signed by a log key of the newest root."""
        stored = self.checkpoints.get(size)
        if stored is None:
            return False
        try:
            logs = transparency_keys(root).logs
        except (InclusionPending, InclusionRefused):
            return False
        for verifier in logs:
            with contextlib.suppress(NoteError):
                open_checkpoint(stored.note, verifier)
                return True
        return False

    async def _bucket(self) -> KeyValue:
        try:
            return await self.js.key_value(TRANSPARENCY_BUCKET)
        except (BucketNotFoundError, NotFoundError):
            return await self.js.create_key_value(
                KeyValueConfig(bucket=TRANSPARENCY_BUCKET, history=1, direct=True,
                               replicas=self.replicas))

    async def start(self) -> None:
        await self._bucket()
        await self.sync()

    def _releases_below(self, size: int) -> list[Entry]:
        releases = query.EntryFilter(kinds=RELEASE_KINDS, before_seq=size)
        with self.store.engine.connect() as conn:
            return query.select_entries(conn, releases, limit=None)

    async def sync(self, size: int | None = None) -> int:
        """Publish the bundles the checkpoint of `size` (default: the latest) makes
        possible; returns how many were written."""
        async with self._lock:
            cp = self.checkpoints.latest() if size is None else self.checkpoints.get(size)
            if cp is None or not witnessed_enough(self.root(), cp):
                return 0
            kv = await self._bucket()
            written = 0
            root = self.root()
            live: dict[int, bool] = {}
            for entry in self._releases_below(cp.size):
                key = transparency_key(str(entry.payload["name"]), str(entry.payload["version"]))
                seq, size = self.published.get(key, (-1, -1))
                if seq >= entry.seq:
                    if size not in live:
                        live[size] = self._signed_by_live_key(root, size)
                    if live[size]:
                        continue
                    log.info("transparency bundle for %s: its checkpoint %d is signed by "
                             "no live log key; re-publishing", key, size)
                await kv.put(key, make_bundle_at(self.store, entry.seq, cp))
                self.published[key] = (entry.seq, cp.size)
                written += 1
                log.info("transparency bundle for %s: seq %d in checkpoint %d", key,
                         entry.seq, cp.size)
            return written
