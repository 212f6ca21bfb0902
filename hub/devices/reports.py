"""Report intake: device reports from the REPORTS stream into the ledger and telemetry.

Devices publish on `fleet.report.<device>.<kind>`. A telemetry window is counted
(hub.telemetry.ingest); a status report (applied / failed / reverted) must be signed by
the device's enrolled key and becomes a ledger event through the single writer. Reports
are fetched in batches and acknowledged only once the batch is stored, so a hub stop
loses nothing (JetStream redelivers) and a redelivered status report is recognised by
its (boot, seq) and not recorded twice.

Poison input (docs/PROTOCOL.md "Bounds"): every report is checked on its own; one that
breaks a rule (malformed, past a bound, oversized, from an unknown or revoked device,
badly signed, a replay, over its device's rate) is refused, counted by reason
(`refused_by_reason`), logged once (one line per device and reason a minute at most)
and acknowledged with its batch: it is never retried and never stops intake. Storage
failures are the other kind: the batch is not acknowledged (negatively acknowledged,
redelivered), nothing it counted is kept, and `StorageUnavailable` ends the intake task
so its supervisor shows the failure and starts it again with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy import bindparam, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from edge_agent import protocol as proto
from edge_agent.protocol import ProtocolError, SignedEnvelope, report_signed_by
from edge_agent.protocol.bins import check_edges
from edge_agent.protocol.names import REPORTS_DURABLE, REPORTS_STREAM
from hub import events as ev
from hub.commands.writer import LedgerWriter
from hub.devices import state as device_state
from hub.devices.state import REVOKED
from hub.governance import state as governance
from hub.telemetry.ingest import TelemetryIngest
from ledger.errors import StoreError
from ledger.storage.store import NewEvent

log = logging.getLogger("hub")

# Reports per fetch: each batch costs a head query, a device query and one telemetry
# transaction, so larger batches share them; below the consumer's 1,000 unacked messages.
REPORT_BATCH = 512
REPORT_SUBJECTS = "fleet.report.>"
# Status reports that become ledger entries, per device: a burst of STATUS_BURST, then
# STATUS_PER_MINUTE a minute (a device reports a handful per update); the excess is
# refused (reason "rate"). With MAX_STATUS_REPORT_BYTES this bounds what one device can
# put into the ledger for good: at most 30 x 16 KiB a minute.
STATUS_PER_MINUTE = 30
STATUS_BURST = 30
REFUSAL_LOG_EVERY_S = 60.0  # one log line per (device, reason) at most this often
REDELIVER_DELAY_S = 1.0  # a batch that could not be stored comes back after this

# Reasons a report is refused, for the counters (status verb, metrics).
REFUSAL_REASONS = ("malformed", "bounds", "oversized", "subject", "unknown-device",
                   "revoked", "signature", "duplicate", "replay", "rate", "unstorable",
                   "error")


class StorageUnavailable(Exception):
    """A batch of reports could not be stored (disk full, database gone): it was not
    acknowledged and comes back; the intake task ends with this (its supervisor
    restarts it with backoff)."""


class Refusal(proto.ProtocolError):
    """A report refused for a rule of the hub (not of the wire format)."""


def storage_failure(exc: BaseException) -> bool:
    """Whether `exc` is the storage failing (retry later) rather than the data (refuse)."""
    if isinstance(exc, StoreError | OSError):
        return True
    return isinstance(exc, DBAPIError) and not isinstance(exc, IntegrityError | DataError)


def check_report_signature(device: dict[str, Any], envelope: SignedEnvelope | None) -> None:
    """Refuse (ProtocolError) a status report not signed by the device's enrolled key."""
    name = device["device"]
    if envelope is None:
        raise ProtocolError(f"unsigned status report from {name}: devices must sign status "
                            "reports with their device key (edge-agent run --bundle DIR)",
                            reason="signature")
    public = device.get("public")
    if not isinstance(public, bytes):
        raise ProtocolError(f"status report from {name}, which has no enrolled key",
                            reason="signature")
    if not report_signed_by(envelope, public):
        signers = ", ".join(s.keyid for s in envelope.signatures) or "none"
        raise ProtocolError(f"status report from {name} is not signed by its enrolled key "
                            f"(signed by: {signers})", reason="signature")


def check_report_order(report: proto.StatusReport, last_boot: str | None,
                       last_seq: int | None) -> None:
    """Refuse (reason "replay") a status report not after the device's last recorded
    one: reports order across boots by (boot counter, seq) (edge_agent.boots). An agent
    older than boot counters sends none; its reports are taken (as before: duplicates
    caught within a boot only) until the device has once sent a counter, and refused
    after that, so a report captured before an upgrade cannot come back either."""
    if last_boot is None or last_seq is None:
        return
    last_counter = proto.boot_counter(last_boot)
    if last_counter is None:
        return
    counter = proto.boot_counter(report.boot)
    if counter is None:
        raise Refusal(f"status report {report.boot}/{report.seq} of {report.device} has no "
                      "boot counter, but the device has sent them since (a replay of an "
                      "older agent's report)", reason="replay")
    if (counter, report.seq) <= (last_counter, last_seq):
        raise Refusal(f"status report {report.boot}/{report.seq} of {report.device} is not "
                      f"after its last recorded one ({last_boot}/{last_seq}): a replay of an "
                      "earlier boot's report", reason="replay")


@dataclass
class ReportBatch:
    """What one fetched batch of reports writes: ledger events and last-seen times."""

    events: list[NewEvent] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)  # device -> newest report ts
    last: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)  # accepted reports by kind


class ReportIntake:
    def __init__(self, writer: LedgerWriter, telemetry: TelemetryIngest) -> None:
        self.writer = writer
        self.telemetry = telemetry
        self.refused_by_reason: dict[str, int] = {}  # since the hub started
        # Reports stored since the hub started, by kind: "telemetry" or the status event.
        self.accepted_by_kind: dict[str, int] = {}
        self.storage_failures = 0  # batches not stored (and not acknowledged)
        # Device rows for report intake, valid while the ledger head is unchanged.
        self._device_cache: dict[str, dict[str, Any] | None] = {}
        self._device_cache_head: int | None = None
        # (model, version) -> (digest, bins per output) of a release, same validity.
        self._shapes: dict[tuple[str, str], tuple[str, list[int]] | None] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # -> (at, suppressed)

    @property
    def refused(self) -> int:
        """Reports refused since the hub started."""
        return sum(self.refused_by_reason.values())

    async def consume(self, js: JetStreamContext) -> None:
        """Fetch, store and acknowledge reports until cancelled; StorageUnavailable
        once a batch could not be stored (it is negatively acknowledged first)."""
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
                if not msgs:
                    continue
                error = await self.take_or_error([(m.subject, m.data) for m in msgs])
                if error is None:
                    # Acknowledged only once the batch is stored: counted exactly once.
                    for msg in msgs:
                        with contextlib.suppress(Exception):
                            await msg.ack()
                    continue
                # Not stored: redelivered soon, with the batch fetched meanwhile.
                more = await pending
                for msg in [*msgs, *more]:
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=REDELIVER_DELAY_S)
                raise StorageUnavailable(f"reports not stored, redelivered: {error}")
        finally:
            pending.cancel()

    async def take(self, reports: Sequence[tuple[str, bytes]]) -> bool:
        """Check and store one fetched batch of (subject, data); True once it is stored
        (then it may be acknowledged), False if it must be delivered again."""
        return await self.take_or_error(reports) is None

    async def take_or_error(self, reports: Sequence[tuple[str, bytes]]) -> str | None:
        """`take`, with the storage error (None: stored, acknowledge the batch). A
        report refused for its content is part of a stored batch."""
        batch = ReportBatch()
        try:
            self._check_device_cache()
            self._load_devices({subject.split(".")[2] for subject, _ in reports
                                if subject.count(".") == 3})
        except Exception as exc:  # the database is busy or gone: not acknowledged
            return self._storage_failed("cannot read the devices of a report batch", exc)
        for subject, data in reports:
            try:
                self._prepare(subject, data, batch)
            except proto.ProtocolError as exc:
                self._refuse(subject, exc.reason, str(exc))
            except Exception as exc:
                if storage_failure(exc):
                    self.telemetry.rollback()
                    return self._storage_failed("cannot read for a report", exc)
                # One poisonous report must never stop intake for the whole fleet.
                self._refuse(subject, "error", f"could not be processed: {exc!r}")
                log.debug("report on %s could not be processed", subject, exc_info=exc)
        try:
            await self._commit(batch)
            self.telemetry.flush()  # rolls the counts back itself if it fails
        except Exception as exc:
            self.telemetry.rollback()
            return self._storage_failed("reports could not be stored", exc)
        for kind, n in batch.kinds.items():
            self.accepted_by_kind[kind] = self.accepted_by_kind.get(kind, 0) + n
        return None

    def _storage_failed(self, what: str, exc: BaseException) -> str:
        self.storage_failures += 1
        error = f"{what}: {exc}"
        log.debug("%s", error, exc_info=exc)  # the supervisor logs the failure once
        return error

    def _refuse(self, subject: str, reason: str, message: str) -> None:
        """Count a refused report by reason; log one line per device and reason a
        minute at most (a flood from one device must not flood the log)."""
        self.refused_by_reason[reason] = self.refused_by_reason.get(reason, 0) + 1
        parts = subject.split(".")
        device = parts[2] if len(parts) == 4 else subject[:64]
        key = (device, reason)
        now = time.monotonic()
        at, suppressed = self._logged.get(key, (-REFUSAL_LOG_EVERY_S, 0))
        if now - at < REFUSAL_LOG_EVERY_S:
            self._logged[key] = (at, suppressed + 1)
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged[key] = (now, 0)
        more = f" ({suppressed} more refused as {reason} since)" if suppressed else ""
        log.warning("refused report on %s (%s): %s%s", subject[:200], reason, message[:500],
                    more)

    def _rate_allows(self, device: str) -> bool:
        """Take one token of the device's status-report bucket, if it has one."""
        now = time.monotonic()
        tokens, at = self._buckets.get(device, (float(STATUS_BURST), now))
        tokens = min(float(STATUS_BURST), tokens + (now - at) * STATUS_PER_MINUTE / 60.0)
        if tokens < 1.0:
            self._buckets[device] = (tokens, now)
            return False
        self._buckets[device] = (tokens - 1.0, now)
        return True

    def _output_shape(self, w: proto.TelemetryWindow) -> list[int] | None:
        """Bins per output of the release the window is from (its drift bins, as the
        manifest carries them), or None if the hub has no such release."""
        key = (w.model, w.version)
        if key not in self._shapes:
            row = self.writer.read(lambda c: governance.get_release(c, w.model, w.version))
            if row is None:
                self._shapes[key] = None
            else:
                shape = []
                for h in (row.get("validation") or {}).get("reference_histograms", []):
                    edges = h.get("edges") if isinstance(h, dict) else None
                    try:
                        check_edges(edges or [])
                    except (ValueError, TypeError):
                        break  # as the agent does: output indexes stay aligned
                    shape.append(len(edges or []) - 1)
                self._shapes[key] = (str(row["digest"]), shape)
        known = self._shapes[key]
        return known[1] if known is not None and known[0] == w.digest else None

    def _check_device_cache(self) -> None:
        """Drop the cached device rows if the ledger moved (an enrolment, a revocation,
        a status report...): one head query per fetched batch instead of one device
        query per telemetry window."""
        head = self.writer.head_seq()
        if head != self._device_cache_head:
            self._device_cache.clear()
            self._shapes.clear()
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
            raise Refusal(f"unexpected report subject {subject}", reason="subject")
        report, envelope = proto.read_report(data)
        if report.device != parts[2]:
            raise Refusal(f"report for device {report.device} arrived on {parts[2]}'s "
                          "subject", reason="subject")
        device = self._device(report.device)
        if device is None:
            raise Refusal(f"report from unknown device {report.device}",
                          reason="unknown-device")
        if device["state"] == REVOKED:
            raise Refusal(f"report from revoked device {report.device}", reason="revoked")
        if isinstance(report, proto.TelemetryWindow):
            self.telemetry.check(report, self._output_shape(report))
            self.telemetry.offer(report)
            batch.kinds["telemetry"] = batch.kinds.get("telemetry", 0) + 1
            return
        check_report_signature(device, envelope)  # refused unless the device's key signed it
        batch.seen[report.device] = max(report.ts, batch.seen.get(report.device, report.ts))
        if report.event == proto.STATUS_STARTED:
            batch.kinds[report.event] = batch.kinds.get(report.event, 0) + 1
            return
        last_boot, last_seq = batch.last.get(
            report.device, (device["last_report_boot"], device["last_report_seq"]))
        if last_boot == report.boot and last_seq is not None and last_seq >= report.seq:
            # Already in the ledger: a redelivery after a hub restart, or a replay.
            raise Refusal(f"status report {report.boot}/{report.seq} of {report.device} "
                          "is already in the ledger", reason="duplicate")
        check_report_order(report, last_boot, last_seq)
        if not self._rate_allows(report.device):
            raise Refusal(f"{report.device} sent more than {STATUS_PER_MINUTE} status "
                          "reports a minute", reason="rate")
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
        batch.kinds[report.event] = batch.kinds.get(report.event, 0) + 1

    async def _commit(self, batch: ReportBatch) -> None:
        """A batch's last-seen times in one transaction, its ledger events in another
        (group commit: one fsync for the batch, not one per report)."""
        if batch.seen:
            self._touch_many(batch.seen)
        if not batch.events:
            return
        async with self.writer.lock:
            try:
                await self.writer.append(batch.events, leader=True)  # intake is the leader's
                return
            except Exception as exc:
                if storage_failure(exc):
                    raise  # nothing was written (one transaction); redelivered
                log.warning("a batch of %d status reports failed (%s); appending them one "
                            "by one", len(batch.events), exc)
            for event in batch.events:  # so one bad event does not hold up the others
                try:
                    await self.writer.append([event], leader=True)
                except Exception as exc:
                    if storage_failure(exc):
                        raise  # those before are in; their redelivery is a duplicate
                    self._refuse(f"fleet.report.{event.actor}.status", "unstorable",
                                 f"its ledger event could not be stored: {exc}")

    def _touch_many(self, seen: dict[str, int]) -> None:
        table = device_state.TELEMETRY
        with self.writer.store.engine.begin() as conn:
            rows = {r.device: r.last_seen for r in conn.execute(
                select(table.c.device, table.c.last_seen).where(table.c.device.in_(list(seen))))}
            new = [{"device": d, "last_seen": ts} for d, ts in seen.items() if d not in rows]
            newer = [{"d": d, "ts": ts} for d, ts in seen.items()
                     if d in rows and ts > (rows[d] or 0)]
            # One executemany each, not one statement per device: a wave of 5,000
            # applied reports touched 5,000 rows one by one (~0.8 ms each).
            if new:
                conn.execute(table.insert(), new)
            if newer:
                conn.execute(table.update().where(table.c.device == bindparam("d"))
                             .values(last_seen=bindparam("ts")), newer)
