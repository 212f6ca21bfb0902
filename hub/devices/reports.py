"""Report intake: device reports from the REPORTS stream into the ledger and telemetry.

Devices publish on `fleet.report.<device>.<kind>`. A telemetry window is counted
(hub.telemetry.ingest); a status report (applied / failed / reverted) must be signed by
the device's enrolled key and becomes a ledger event through the single writer. Reports
are fetched in batches and acknowledged only once the batch is stored, so a hub stop
loses nothing (JetStream redelivers) and a redelivered status report is recognised by
its (boot, seq) and not recorded twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy import select

from edge_agent import protocol as proto
from edge_agent.protocol import ProtocolError, SignedEnvelope, report_signed_by
from edge_agent.protocol.names import REPORTS_DURABLE, REPORTS_STREAM
from hub import events as ev
from hub.commands.writer import LedgerWriter
from hub.devices import state as device_state
from hub.devices.state import REVOKED
from hub.telemetry.ingest import TelemetryIngest
from ledger.storage.store import NewEvent

log = logging.getLogger("hub")

# Reports per fetch: each batch costs a head query, a device query and one telemetry
# transaction, so larger batches share them; below the consumer's 1,000 unacked messages.
REPORT_BATCH = 512
REPORT_SUBJECTS = "fleet.report.>"


def check_report_signature(device: dict[str, Any], envelope: SignedEnvelope | None) -> None:
    """Refuse (ProtocolError) a status report not signed by the device's enrolled key."""
    name = device["device"]
    if envelope is None:
        raise ProtocolError(f"unsigned status report from {name}: devices must sign status "
                            "reports with their device key (edge-agent run --bundle DIR)")
    public = device.get("public")
    if not isinstance(public, bytes):
        raise ProtocolError(f"status report from {name}, which has no enrolled key")
    if not report_signed_by(envelope, public):
        signers = ", ".join(s.keyid for s in envelope.signatures) or "none"
        raise ProtocolError(f"status report from {name} is not signed by its enrolled key "
                            f"(signed by: {signers})")


@dataclass
class ReportBatch:
    """What one fetched batch of reports writes: ledger events and last-seen times."""

    events: list[NewEvent] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)  # device -> newest report ts
    last: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)


class ReportIntake:
    def __init__(self, writer: LedgerWriter, telemetry: TelemetryIngest) -> None:
        self.writer = writer
        self.telemetry = telemetry
        self.refused = 0  # reports refused since the hub started
        # Device rows for report intake, valid while the ledger head is unchanged.
        self._device_cache: dict[str, dict[str, Any] | None] = {}
        self._device_cache_head: int | None = None

    async def consume(self, js: JetStreamContext) -> None:
        """Fetch, store and acknowledge reports until cancelled."""
        sub = await js.pull_subscribe(REPORT_SUBJECTS, durable=REPORTS_DURABLE,
                                      stream=REPORTS_STREAM)

        async def fetch() -> list[Msg]:
            try:
                return await sub.fetch(REPORT_BATCH, timeout=1.0)
            except TimeoutError:
                return []
            except Exception as exc:  # disconnected: nats-py reconnects; try again shortly
                log.warning("report fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                return []

        # The next batch is requested while this one is processed (one fetch in flight at
        # a time), so the fetch round trip overlaps the hub's work instead of adding to it.
        pending = asyncio.create_task(fetch())
        try:
            while True:
                msgs = await pending
                pending = asyncio.create_task(fetch())
                if msgs and await self.take([(m.subject, m.data) for m in msgs]):
                    # Acknowledged only once the batch is stored: counted exactly once.
                    for msg in msgs:
                        with contextlib.suppress(Exception):
                            await msg.ack()
        finally:
            pending.cancel()

    async def take(self, reports: Sequence[tuple[str, bytes]]) -> bool:
        """Check and store one fetched batch of (subject, data); True once it is stored
        (then it may be acknowledged), False if it must be delivered again."""
        batch = ReportBatch()
        try:
            self._check_device_cache()
            self._load_devices({subject.split(".")[2] for subject, _ in reports
                                if subject.count(".") == 3})
        except Exception:  # the database is busy or gone: not acknowledged, redelivered
            log.exception("cannot read the devices of a report batch")
            await asyncio.sleep(0.5)
            return False
        for subject, data in reports:
            try:
                self._prepare(subject, data, batch)
            except proto.ProtocolError as exc:
                self.refused += 1
                log.warning("refused report on %s: %s", subject, exc)
            except Exception:
                # One poisonous report must never stop intake for the whole fleet.
                self.refused += 1
                log.exception("report on %s could not be processed", subject)
        try:
            await self._commit(batch)
        except Exception:
            log.exception("status reports could not be stored; redelivered later")
            return False  # not acknowledged: JetStream redelivers them
        self.telemetry.flush()
        return True

    def _check_device_cache(self) -> None:
        """Drop the cached device rows if the ledger moved (an enrolment, a revocation,
        a status report...): one head query per fetched batch instead of one device
        query per telemetry window."""
        head = self.writer.head_seq()
        if head != self._device_cache_head:
            self._device_cache.clear()
            self._device_cache_head = head

    def _load_devices(self, devices: set[str]) -> None:
        """The rows of a fetched batch's devices in one query. During a rollout every
        batch moves the ledger head (status reports), so the cache above is cold for
        each batch, and one query per report was the hub's largest intake cost."""
        missing = sorted(d for d in devices if d not in self._device_cache)
        if not missing:
            return
        rows = self.writer.read(lambda conn: device_state.get_devices(conn, missing))
        for device in missing:
            self._device_cache[device] = rows.get(device)

    def _device(self, device: str) -> dict[str, Any] | None:
        if device in self._device_cache:
            return self._device_cache[device]
        row = self.writer.read(lambda conn: device_state.get_device(conn, device))
        self._device_cache[device] = row
        return row

    def _prepare(self, subject: str, data: bytes, batch: ReportBatch) -> None:
        """Check one report; count a telemetry window, or add a status report's ledger
        event and last-seen time to `batch` (stored by _commit)."""
        parts = subject.split(".")
        if len(parts) != 4:
            raise proto.ProtocolError(f"unexpected report subject {subject}")
        report, envelope = proto.read_report(data)
        if report.device != parts[2]:
            raise proto.ProtocolError(
                f"report for device {report.device} arrived on {parts[2]}'s subject"
            )
        device = self._device(report.device)
        if device is None:
            raise proto.ProtocolError(f"report from unknown device {report.device}")
        if device["state"] == REVOKED:
            raise proto.ProtocolError(f"report from revoked device {report.device}")
        if isinstance(report, proto.TelemetryWindow):
            self.telemetry.offer(report)
            return
        check_report_signature(device, envelope)  # refused unless the device's key signed it
        batch.seen[report.device] = max(report.ts, batch.seen.get(report.device, report.ts))
        if report.event == proto.STATUS_STARTED:
            return
        last_boot, last_seq = batch.last.get(
            report.device, (device["last_report_boot"], device["last_report_seq"]))
        if last_boot == report.boot and last_seq is not None and last_seq >= report.seq:
            return  # already in the ledger (a redelivery after a hub restart)
        batch.last[report.device] = (report.boot, report.seq)
        common = {
            "device": report.device, "model": report.model, "version": report.version,
            "digest": report.digest, "counter": report.counter, "boot": report.boot,
            "report_seq": report.seq, "report": data,
        }
        if report.event == proto.STATUS_APPLIED:
            kind = ev.DEVICE_UPDATE_APPLIED
            payload = {**common, "probe_output": [float(v) for v in report.probe_output]}
        elif report.event == proto.STATUS_REVERTED:
            kind = ev.DEVICE_UPDATE_REVERTED
            payload = {**common, "reason": report.reason}
        else:
            kind = ev.DEVICE_UPDATE_FAILED
            payload = {**common, "reason": report.reason}
        batch.events.append(
            NewEvent(kind, report.device, ev.device_subject(report.device), payload))

    async def _commit(self, batch: ReportBatch) -> None:
        """A batch's last-seen times in one transaction, its ledger events in another
        (group commit: one fsync for the batch, not one per report)."""
        if batch.seen:
            self._touch_many(batch.seen)
        if not batch.events:
            return
        async with self.writer.lock:
            try:
                await self.writer.append(batch.events)
                return
            except Exception:
                if len(batch.events) == 1:
                    raise
                log.warning("a batch of %d status reports failed; appending them one by one",
                            len(batch.events))
            for event in batch.events:  # so one bad event does not hold up the others
                try:
                    await self.writer.append([event])
                except Exception:
                    self.refused += 1
                    log.exception("status report of %s could not be stored", event.subject)

    def _touch_many(self, seen: dict[str, int]) -> None:
        table = device_state.TELEMETRY
        with self.writer.store.engine.begin() as conn:
            rows = {r.device: r.last_seen for r in conn.execute(
                select(table.c.device, table.c.last_seen).where(table.c.device.in_(list(seen))))}
            for device, ts in seen.items():
                if device not in rows:
                    conn.execute(table.insert().values(device=device, last_seen=ts))
                elif ts > (rows[device] or 0):
                    conn.execute(table.update().where(table.c.device == device)
                                 .values(last_seen=ts))
