"""What the agent reports, and getting it to the hub.

Status reports (signed with the device key) and telemetry windows are built here,
written to the durable spool (edge_agent.spool) first, and sent by `send_outbox`, which
retries each one until JetStream acknowledges it; the message id
(`<device>.<boot>.<seq>`) lets JetStream and the hub drop the copies sent twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from numpy.typing import NDArray

from edge_agent import protocol as proto
from edge_agent.protocol import names
from edge_agent.spool import Spool
from edge_agent.telemetry import TelemetryWindowBuilder
from edge_agent.transport import ReportSink
from ledger.signing import SigningKey

MAX_UNSPOOLED = 1000  # reports kept in memory while the disk is full

log = logging.getLogger("edge_agent")


class Reporter:
    """The device's reports: numbered per boot, spooled, then sent."""

    def __init__(
        self,
        device_id: str,
        boot: str,
        spool: Spool,
        device_key: SigningKey | None,
        on_window: Callable[[int], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.boot = boot
        self.spool = spool
        self.device_key = device_key
        self._on_window = on_window
        self.seq = 0
        self._spooled = asyncio.Event()
        self._window = TelemetryWindowBuilder()
        self._window_meta: dict[str, Any] = {}  # the model the open window counts
        # Reports the spool could not take (the disk is full), oldest first, sent from
        # memory; while any wait here, new ones queue behind them so order holds.
        self._unspooled: deque[tuple[str, str, bytes]] = deque()

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # ------------------------------------------------------------ telemetry

    def follow_model(self, meta: dict[str, Any]) -> None:
        """Count the next inferences for the model `meta` describes; a change of model
        closes the previous model's window first."""
        if (self._window_meta.get("digest"), self._window_meta.get("counter")) != (
            meta.get("digest"), meta.get("counter")
        ):
            self.emit_window()  # the previous model's last window
            self._window_meta = dict(meta)
            self._window.set_drift_bins(meta.get("drift_bins") or [],
                                        meta.get("output_quantization"),
                                        tensors=meta.get("drift_tensors") or None,
                                        tensor_quantization=meta.get("outputs_quantization"))

    def record(self, latency_ms: float, ok: bool,
               output: NDArray[Any] | Sequence[NDArray[Any]] | None) -> None:
        """Count one inference in the open window."""
        self._window.record(latency_ms, ok, output)

    def emit_window(self) -> None:
        """Close the open telemetry window and spool it (nothing if it counted nothing)."""
        count = self._window.count
        summary = self._window.take()
        if summary is None:
            return
        meta = self._window_meta
        window = proto.TelemetryWindow(
            device=self.device_id, boot=self.boot, seq=self._next_seq(),
            model=str(meta.get("model", "")), version=str(meta.get("version", "")),
            digest=str(meta.get("digest", "")), counter=int(meta.get("counter", 0)),
            dropped=self.spool.dropped, **summary,
        )
        self._enqueue("telemetry", proto.encode_report(window), window.seq)
        if self._on_window is not None:
            self._on_window(count)

    # ------------------------------------------------------------ status

    def status(
        self,
        event: str,
        reason: str,
        meta: dict[str, Any],
        assignment: proto.Assignment | None = None,
        probe_output: list[float] | None = None,
        counter: int | None = None,
    ) -> None:
        """Spool a status report: about `assignment`, else about the model `meta` says."""
        if counter is None:
            counter = assignment.counter if assignment else int(meta.get("counter", 0))
        report = proto.StatusReport(
            device=self.device_id, boot=self.boot, seq=self._next_seq(), ts=time.time_ns(),
            event=event,
            model=assignment.model if assignment else str(meta.get("model", "")),
            version=assignment.version if assignment else str(meta.get("version", "")),
            digest=assignment.digest if assignment else str(meta.get("digest", "")),
            counter=counter,
            reason=reason[:1000],
            probe_output=probe_output or [],
        )
        data = (proto.encode_signed_report(report, self.device_key) if self.device_key
                else proto.encode_report(report))  # unsigned: the hub will refuse it
        self._enqueue("status", data, report.seq)

    # ------------------------------------------------------------ the outbox

    def _enqueue(self, kind: str, data: bytes, seq: int) -> None:
        # Durable and bounded: a full spool drops its oldest and counts it (never silent).
        item = (names.report_subject(self.device_id, kind),
                names.report_msg_id(self.device_id, self.boot, seq), data)
        if not self._unspooled:
            try:
                self.spool.append(*item)
                self._spooled.set()
                return
            except OSError as exc:  # disk full: never lose the report, never crash
                log.warning("cannot spool a %s report (%s); keeping it in memory until sent",
                            kind, exc)
        if len(self._unspooled) >= MAX_UNSPOOLED:
            self._unspooled.popleft()
            self.spool.dropped += 1  # counted in the next telemetry window
        self._unspooled.append(item)
        self._spooled.set()

    @property
    def unspooled(self) -> int:
        """Reports waiting in memory because the spool could not take them."""
        return len(self._unspooled)

    async def send_outbox(self, sink: ReportSink, stopping: Callable[[], bool]) -> None:
        """Send what is spooled, oldest first, each until acknowledged, then what waits
        in memory (it came later); then wait for more."""
        while not stopping():
            record = self.spool.peek()
            if record is not None:
                await _publish_until_acked(sink, record.subject, record.data, record.msg_id)
                self.spool.ack(record)
            elif self._unspooled:
                subject, msg_id, data = self._unspooled[0]
                await _publish_until_acked(sink, subject, data, msg_id)
                self._unspooled.popleft()
            else:
                self._spooled.clear()
                await self._spooled.wait()

    async def flush(self, sink: ReportSink, timeout: float) -> None:
        """Try to send what is spooled; what is left stays on disk for the next start."""
        deadline = time.monotonic() + timeout
        while (record := self.spool.peek()) is not None and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(
                    _publish_until_acked(sink, record.subject, record.data, record.msg_id),
                    max(0.1, deadline - time.monotonic()),
                )
            except Exception:
                return
            self.spool.ack(record)


async def _publish_until_acked(sink: ReportSink, subject: str, data: bytes, msg_id: str) -> None:
    delay = 0.2
    while True:
        try:
            await sink.publish(subject, data, msg_id)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # disconnected or stream not there yet: retry
            log.debug("report publish failed (%s); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
