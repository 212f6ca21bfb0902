"""Bring the assignments bucket (KV) back in line with the ledger (at hub start, then
continuously from the reconciler, hub/service/reconcile.py).

The hub appends a `device.assigned` event first and writes the signed assignment to KV
after the commit (a device must never run what the ledger does not show). A hub that
dies between the two, or that gives up on a KV write during a long NATS outage, leaves
a device without the assignment the ledger says it has, and nothing would ever re-send
it: devices act only on KV. So the hub compares, per device, the counter the
ledger issued last (proj_devices.counter) with the counter of the assignment in KV, and
puts the ledger's own signed envelope (the bytes in the event) where KV is behind or
missing. Idempotent: a second run finds nothing to do and writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sqlalchemy import Engine, select

from edge_agent import protocol as proto
from edge_agent.protocol.names import ASSIGNMENTS_BUCKET
from hub import events as ev
from hub.devices import state as device_state
from hub.devices.assignments import write_all
from hub.devices.state import REVOKED
from ledger.entry import Entry
from ledger.storage import query

log = logging.getLogger("hub.assignments")

READ_TIMEOUT_S = 30.0


@dataclass
class SyncResult:
    checked: int = 0  # devices the ledger has issued an assignment to
    restored: list[str] = field(default_factory=list)  # put back into KV
    ahead: list[str] = field(default_factory=list)  # KV newer than the ledger: left alone


async def kv_counters(kv: KeyValue) -> dict[str, tuple[int, int]]:
    """device -> (counter of the assignment KV holds now (-1: unreadable), its KV
    revision), read with one watch over the bucket rather than one request per device."""
    out: dict[str, tuple[int, int]] = {}
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        while True:
            entry = await watcher.updates(timeout=READ_TIMEOUT_S)
            if entry is None:  # nats-py's marker: the current values are all in
                break
            try:
                doc = proto.SignedEnvelope.decode(entry.value or b"", "assignment")
                counter = proto.Assignment.from_map(doc.document("assignment")).counter
            except proto.ProtocolError:
                counter = -1  # garbage in KV: the ledger's envelope replaces it
            out[entry.key] = (counter, entry.revision or 0)
            if entry.delta == 0:  # nothing pending after this one (the marker may follow)
                break
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
    return out


def last_assignment(engine: Engine, device: str) -> Entry | None:
    assigned = query.EntryFilter(kinds=(ev.DEVICE_ASSIGNED,), subject=ev.device_subject(device))
    with engine.connect() as conn:
        return query.last_entry(conn, assigned)


async def reconcile_assignments(js: JetStreamContext, engine: Engine) -> SyncResult:
    """Put the ledger's latest assignment into KV for every device whose KV entry is
    missing or older (see the module docstring)."""
    devices = device_state.DEVICES
    with engine.connect() as conn:
        issued = {r.device: int(r.counter) for r in conn.execute(
            select(devices.c.device, devices.c.counter)
            .where(devices.c.counter > 0, devices.c.state != REVOKED))}
    result = SyncResult(checked=len(issued))
    if not issued:
        return result
    kv = await js.key_value(ASSIGNMENTS_BUCKET)
    in_kv = await kv_counters(kv)
    writes: list[tuple[str, bytes]] = []
    seen: dict[str, int] = {}  # device -> the KV revision its decision was made on (0: none)
    for device in sorted(issued):
        have, revision = in_kv.get(device, (None, 0))
        want = issued[device]
        seen[device] = revision
        if have is not None and have > want:
            result.ahead.append(device)  # not from this ledger; the device refuses replays
            continue
        if have == want:
            continue
        entry = last_assignment(engine, device)
        envelope = None if entry is None else entry.payload.get("assignment")
        if entry is None or entry.payload.get("counter") != want or not isinstance(
                envelope, bytes):
            log.error("ledger says %s has assignment %d but holds no such event", device, want)
            continue
        writes.append((device, envelope))

    lost: set[str] = set()

    async def put(device: str, envelope: bytes) -> None:
        # Only over the value this decision read: the ledger and KV were read a while
        # ago (10,000 keys take seconds), and the controller may have committed and
        # written a newer assignment meanwhile; an unconditional put would put the
        # older one back over it (seen at 10,000 devices: devices refused counter 1
        # after applying 2). A key that moved is left to the next round.
        try:
            if seen[device]:
                await kv.update(device, envelope, last=seen[device])
            else:
                await kv.create(device, envelope)
        except KeyWrongLastSequenceError:
            lost.add(device)

    await write_all(put, writes)  # batched; the first failure is raised after them all
    result.restored = [device for device, _ in writes if device not in lost]
    if result.restored:
        log.warning("restored %d assignment(s) the ledger has but KV did not (a hub stop "
                    "between commit and KV write, a write left, a key deleted): %s",
                    len(result.restored),
                    ", ".join(result.restored[:10]) + (" ..." if len(result.restored) > 10
                                                       else ""))
    if result.ahead:
        log.error("KV holds assignments newer than the ledger for %d device(s), left as "
                  "they are: %s", len(result.ahead), ", ".join(result.ahead[:10]))
    return result
