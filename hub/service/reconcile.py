"""Keep NATS KV in line with the ledger, continuously (a supervised hub task).

Devices act only on what KV holds, and the hub writes KV only after the ledger commits;
a write can fail (a NATS outage, a hub stop between commit and write) and a key can be
deleted behind the hub's back. Every `every_s` seconds, at once after the hub's NATS
connection reconnects, and when nudged (a write left by the rollout controller), the
reconciler:

1. renews live assignments before they expire: an assignment with less than a third
   of its lifetime left is issued again through `AssignmentIssuer` (same release, the
   device's next counter, a new expiry), appended to the ledger like any assignment
   (`device.assigned`, `resigned: true`, reason "renewed before expiry"), then put in KV;
2. puts into KV what the ledger says where KV differs: each device's newest assignment
   (the ledger's own signed bytes, compared by counter: hub.devices.assignment_sync),
   each live release's newest manifest, every trust root and `root.latest`;
3. copies into the Object Store bucket `releases` (what devices read) each live
   release's blob that it lacks, from the hub's own `models` bucket (hub.uploads);
4. retries the model-transparency bundles not yet published, and republishes them all
   if their bucket changed behind the hub's back;
5. puts the signed timestamp back if the `roots` bucket lacks it or holds another
   (hub/keys/timestamps.py; devices install nothing new without a fresh one).

Cheap at 1,000+ devices: a round first reads the ledger head and each bucket's last
stream sequence (one request per bucket; a put, a delete or a purge all move it). While
those are what they were at the last round that found nothing to do, nothing is read or
written. Only when something changed does it compare, with one watch per bucket
(counters for assignments, not values), and write what differs, 64 writes in flight.

A round that fails (NATS down) is retried with backoff (0.5 s doubling, at most
`every_s`), for as long as it takes: nothing is ever given up. One line is logged when
rounds start failing and one when they work again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from sqlalchemy import Connection, select

from edge_agent import protocol as proto
from edge_agent.protocol.names import (
    ASSIGNMENTS_BUCKET,
    MANIFESTS_BUCKET,
    MODELS_BUCKET,
    RELEASES_BUCKET,
    ROOTS_BUCKET,
)
from hub import events as ev
from hub.clock import Clock
from hub.commands.writer import LedgerWriter
from hub.devices import state as device_state
from hub.devices.assignment_sync import READ_TIMEOUT_S, reconcile_assignments
from hub.devices.assignments import AssignmentIssuer, PutAssignment, write_all
from hub.devices.state import REVOKED
from hub.governance import state as governance
from hub.keys.commands import live_manifests
from hub.keys.keyring import Keyring
from hub.keys.roots import wanted_roots
from hub.uploads import copy_blob
from ledger.storage import query

log = logging.getLogger("hub.reconcile")

BUCKETS = (ASSIGNMENTS_BUCKET, MANIFESTS_BUCKET, ROOTS_BUCKET)
RENEW_WHEN_LEFT = 1 / 3  # renew an assignment when less than this share of its life is left
POLL_S = 0.25  # how often the wait between rounds looks at the reconnect count


@dataclass
class RoundResult:
    renewed: list[str] = field(default_factory=list)
    assignments: list[str] = field(default_factory=list)  # devices whose KV entry was put
    manifests: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)  # digests copied into `releases`
    bundles: int = 0
    timestamp: bool = False  # the signed timestamp was put back
    skipped: bool = False  # nothing changed since the last clean round: nothing read

    @property
    def wrote(self) -> bool:
        return bool(self.renewed or self.assignments or self.manifests or self.roots
                    or self.blobs or self.bundles or self.timestamp)


@dataclass
class Reconciler:
    writer: LedgerWriter
    issuer: AssignmentIssuer
    keyring: Keyring
    js: Callable[[], JetStreamContext]
    put_assignment: PutAssignment
    clock: Clock
    every_s: float = 30.0
    reconnects: Callable[[], int] = lambda: 0  # the NATS client's reconnect count
    transparency: Callable[[bool], Awaitable[int]] | None = None  # (republish all) -> written
    timestamp: Callable[[], Awaitable[bool]] | None = None  # restore it -> written
    rounds: int = 0
    last: RoundResult = field(default_factory=RoundResult)
    _clean: tuple[int, ...] | None = None  # ledger head + bucket seqs of the last clean round
    _bundles_seq: int | None = None
    _expiry: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    _expiry_seq: int = -1  # device.assigned entries up to this seq are in _expiry
    _nudged: asyncio.Event = field(default_factory=asyncio.Event)
    _blob_failures: set[str] = field(default_factory=set)  # logged once each

    def nudge(self) -> None:
        """Run a round now (a KV write was left undone)."""
        self._nudged.set()

    async def run(self) -> None:
        backoff = 0.5
        failing = ""
        while True:
            try:
                self.last = await self.round()
                self.rounds += 1
                if failing:
                    log.info("KV reconciliation works again")
                    failing = ""
                backoff = 0.5
                wait = min(self.every_s, self._next_renewal_in())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down, a timeout: retried, never given up
                error = f"{type(exc).__name__}: {exc}"
                if not failing:
                    log.warning("cannot reconcile KV with the ledger (%s); retrying", error)
                log.debug("reconcile round failed", exc_info=exc)
                failing = error
                wait, backoff = backoff, min(backoff * 2, self.every_s)
            await self._wait(wait)

    async def _wait(self, seconds: float) -> None:
        reconnects = self.reconnects()
        deadline = self.clock.monotonic_ns() + int(seconds * 1e9)
        while self.clock.monotonic_ns() < deadline:
            if self.reconnects() != reconnects:
                log.info("NATS reconnected: reconciling KV now")
                self._clean = None  # a server restarted from an old store may differ
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), POLL_S)
            if self._nudged.is_set():
                self._nudged.clear()
                return

    # ------------------------------------------------------------ one round

    async def round(self) -> RoundResult:
        result = RoundResult()
        result.renewed = await self.renew()
        js = self.js()
        gate = await self._gate(js)
        if gate == self._clean:
            result.skipped = True
        else:
            engine = self.writer.store.engine
            result.assignments = (await reconcile_assignments(js, engine)).restored
            with engine.connect() as conn:
                live = live_manifests(conn)
                manifests = {proto.manifest_key(name, version): envelope
                             for name, version, envelope in live}
                blobs = {}
                for name, version, _ in live:
                    row = governance.get_release(conn, name, version)
                    if row is not None:
                        blobs[str(row["digest"])] = int(row["size"])
            result.blobs = await self._sync_blobs(js, blobs)
            result.manifests = await _sync_bucket(js, MANIFESTS_BUCKET, manifests)
            roots = wanted_roots(self.keyring, self.writer.store)
            result.roots = await _sync_bucket(js, ROOTS_BUCKET, roots)
            if self.timestamp is not None:
                result.timestamp = await self.timestamp()
            for what, keys in (("released blob", result.blobs), ("manifest", result.manifests),
                               ("trust root", result.roots)):
                if keys:
                    log.warning("restored %d %s key(s) KV lacked or held otherwise: %s",
                                len(keys), what, ", ".join(keys[:10]))
            # Clean only if nothing had to be written: the state the gate describes
            # is then the one checked (a write of ours moves it; the next round checks).
            self._clean = None if result.wrote or self._blob_failures else gate
        if self.transparency is not None:
            result.bundles = await self._sync_bundles(js)
        return result

    async def _gate(self, js: JetStreamContext) -> tuple[int, ...]:
        head = self.writer.head_seq()
        seqs = [(await js.stream_info(f"KV_{bucket}")).state.last_seq for bucket in BUCKETS]
        seqs.append((await js.stream_info(f"OBJ_{RELEASES_BUCKET}")).state.last_seq)
        return (-1 if head is None else head, *seqs)

    async def _sync_blobs(self, js: JetStreamContext, wanted: dict[str, int]) -> list[str]:
        """Copy into `releases` each wanted blob (digest -> size) it lacks. A blob that
        cannot be copied (gone from `models` too) is logged once and skipped: the rest
        of the round goes on, and the next round (the gate stays unclean) tries again."""
        copied = []
        for digest, size in wanted.items():
            try:
                if await copy_blob(js, MODELS_BUCKET, RELEASES_BUCKET, digest, size):
                    copied.append(digest)
                self._blob_failures.discard(digest)
            except Exception as exc:
                if digest not in self._blob_failures:
                    self._blob_failures.add(digest)
                    log.warning("cannot restore released blob %s in %s: %s", digest[:16],
                                RELEASES_BUCKET, exc)
        return copied

    async def _sync_bundles(self, js: JetStreamContext) -> int:
        from edge_agent.protocol.names import TRANSPARENCY_BUCKET

        assert self.transparency is not None
        try:
            seq = (await js.stream_info(f"KV_{TRANSPARENCY_BUCKET}")).state.last_seq
        except Exception:  # not created yet (the publisher makes it at start)
            seq = None
        changed = self._bundles_seq is not None and seq != self._bundles_seq
        written = await self.transparency(changed)
        if changed or written:
            seq = (await js.stream_info(f"KV_{TRANSPARENCY_BUCKET}")).state.last_seq
        self._bundles_seq = seq
        return written

    # ------------------------------------------------------------ renewal

    async def renew(self) -> list[str]:
        """Issue again every live assignment with less than a third of its life left."""
        now = self.clock.wall_ns()
        if not self.writer.read(lambda c: self._due(c, now)):
            return []
        async with self.writer.lock:
            with self.writer.store.engine.connect() as conn:
                due = self._due(conn, now)  # again, under the lock
                issued = self.issuer.reissue(conn, ev.HUB_ACTOR, self.issuer.signers(), {},
                                             "renewed before expiry", only=set(due))
            if issued.events:
                await self.writer.append(issued.events, leader=True)
        devices = [device for device, _ in issued.writes]
        if devices:
            log.info("renewed %d assignment(s) before expiry: %s", len(devices),
                     ", ".join(devices[:10]) + (" ..." if len(devices) > 10 else ""))
        # A write that fails is the next round's: the ledger head moved.
        await write_all(self.put_assignment, issued.writes, give_up_s=0)
        return devices

    def _due(self, conn: Connection, now_ns: int) -> list[str]:
        self._scan_expiry(conn)
        if not self._expiry:
            return []
        devices = device_state.DEVICES
        current = {r.device: int(r.counter) for r in conn.execute(
            select(devices.c.device, devices.c.counter)
            .where(devices.c.counter > 0, devices.c.state != REVOKED))}
        return sorted(d for d, (counter, issued, expires) in self._expiry.items()
                      if current.get(d) == counter and now_ns >= _renew_at(issued, expires))

    def _scan_expiry(self, conn: Connection) -> None:
        """Each device's newest assignment (counter, issued_at, expires), read
        incrementally: only `device.assigned` entries since the last scan."""
        assigned = query.EntryFilter(kinds=(ev.DEVICE_ASSIGNED,), after_seq=self._expiry_seq)
        for entry in query.iter_entries(conn, assigned):
            self._expiry_seq = entry.seq
            envelope = entry.payload.get("assignment")
            if not isinstance(envelope, bytes):
                continue
            try:
                doc = proto.SignedEnvelope.decode(envelope, "assignment")
                a = proto.Assignment.from_map(doc.document("assignment"))
            except proto.ProtocolError:
                continue
            self._expiry[a.device] = (a.counter, a.issued_at, a.expires)

    def _next_renewal_in(self) -> float:
        if not self._expiry:
            return self.every_s
        now = self.clock.wall_ns()
        soonest = min(_renew_at(i, e) for _, i, e in self._expiry.values())
        return max(POLL_S, (soonest - now) / 1e9) if soonest > now else self.every_s


def _renew_at(issued_at: int, expires: int) -> int:
    return expires - int((expires - issued_at) * RENEW_WHEN_LEFT)


async def kv_values(kv: KeyValue) -> dict[str, bytes]:
    """key -> value of every key in a (small) bucket, read with one watch."""
    out: dict[str, bytes] = {}
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        while True:
            entry = await watcher.updates(timeout=READ_TIMEOUT_S)
            if entry is None:
                break
            out[entry.key] = entry.value or b""
            if entry.delta == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
    return out


async def _sync_bucket(js: JetStreamContext, bucket: str, wanted: dict[str, bytes]
                       ) -> list[str]:
    """Put every wanted key whose value KV lacks or holds otherwise, in `wanted`'s order."""
    kv = await js.key_value(bucket)
    have = await kv_values(kv)
    put = [key for key, value in wanted.items() if have.get(key) != value]
    for key in put:
        await kv.put(key, wanted[key])
    return put
