"""Prometheus metrics of the hub on `GET /metrics`, made with prometheus-client.

Each hub has its own `CollectorRegistry` (`HubMetrics.registry`; nothing global, so two
hubs in one process, or one test after another, never share a series). Most families
come from `HubCollector`, which reads the hub's state when it is scraped: the values are
exact (full precision, as prometheus-client prints floats) and nothing has to be kept in
step with the state. One family is measured as it happens: the ledger append latency
(`fleet_ledger_append_seconds`, a prometheus-client `Histogram` fed by the hub's
`LedgerWriter`).

Labels are bounded: no series has a label whose value changes for the same thing (a
device's or a rollout's state is one series per state, holding a count or 0/1), and
rollouts are shown while active plus the last FINISHED_ROLLOUTS_SHOWN finished ones.

The page is served by `MetricsServer`, a small asyncio handler that calls prometheus-
client's encoder on the hub's event loop (not its threaded HTTP server: a scrape then
reads the hub's in-memory counters on the same thread that changes them). Listen address
from `hub serve --metrics ADDR:PORT` (or `--metrics-port P` = 127.0.0.1:P) or
config.toml `metrics_listen` / `metrics_port`; off by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from edge_agent.protocol import STATUS_EVENTS
from edge_agent.protocol.bins import LATENCY_BUCKETS_MS
from hub.devices import state as device_state
from hub.rollouts import rules as ro
from hub.rollouts import state as rs
from hub.telemetry.ingest import TelemetryIngest
from ledger.storage.store import LedgerStore

log = logging.getLogger("hub.metrics")

FINISHED_ROLLOUTS_SHOWN = 10  # finished rollouts kept on the page, newest first
DEVICE_STATES = ("enrolled", "assigned", "applied", "failed", "reverted",
                 device_state.REVOKED)
ROLLOUT_STATES = (ro.CREATED, ro.RUNNING, ro.PAUSED, ro.HALTED, ro.COMPLETED, ro.ABORTED,
                  ro.ROLLED_BACK)
ROLLOUT_DEVICE_STATES = (ro.DEV_PLANNED, ro.DEV_ASSIGNED, ro.DEV_APPLIED, ro.DEV_FAILED,
                         ro.DEV_REVERTED, ro.DEV_TIMED_OUT, ro.DEV_ROLLED_BACK, ro.DEV_REVOKED)
REPORT_KINDS = ("telemetry", *STATUS_EVENTS)
# One append is one transaction (fsync included): from well under a millisecond
# (SQLite, a page in cache) to seconds (a busy PostgreSQL, a slow disk).
APPEND_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricSources:
    """Where the collector reads the hub's state (each read at scrape time)."""

    store: LedgerStore
    telemetry: TelemetryIngest
    reports_accepted: Callable[[], Mapping[str, int]]  # by kind
    reports_refused: Callable[[], Mapping[str, int]]  # by reason
    refusal_reasons: tuple[str, ...]  # every reason, so each series exists from the start
    replies_refused: Callable[[], Mapping[str, int]]  # by reason
    reply_reasons: tuple[str, ...]
    tasks: Callable[[], list[dict[str, Any]]]  # Supervisor.states()


def _ns_to_s(ns: int | None) -> float:
    return 0.0 if not ns else ns / 1e9


def latency_sum_s(counts: list[int]) -> float:
    """The `_sum` of a latency histogram from its bucket counts alone (devices send no
    sum): each inference at its bucket's midpoint, those past the last bound at that
    bound. An estimate, documented as one (docs/ARCHITECTURE.md "Metrics")."""
    total_ms = 0.0
    lower = 0.0
    for i, n in enumerate(counts):
        if i < len(LATENCY_BUCKETS_MS):
            upper = LATENCY_BUCKETS_MS[i]
            total_ms += n * (lower + upper) / 2.0
            lower = upper
        else:
            total_ms += n * LATENCY_BUCKETS_MS[-1]
    return total_ms / 1000.0


class HubCollector(Collector):
    """The hub's families, read from its state at scrape time."""

    def __init__(self, sources: MetricSources,
                 finished_rollouts: int = FINISHED_ROLLOUTS_SHOWN) -> None:
        self.sources = sources
        self.finished_rollouts = finished_rollouts

    def collect(self) -> Iterator[Any]:
        yield from self._devices_and_rollouts()
        yield from self._telemetry()
        yield from self._intake()
        yield from self._tasks()
        yield from self._ledger()

    # ------------------------------------------------------------ ledger state

    def _devices_and_rollouts(self) -> Iterator[Any]:
        d, t, r, rd = (device_state.DEVICES, device_state.TELEMETRY, rs.ROLLOUTS,
                       rs.ROLLOUT_DEVICES)
        with self.sources.store.engine.connect() as conn:
            running = conn.execute(select(d.c.model, d.c.version, func.count())
                                   .group_by(d.c.model, d.c.version)).all()
            states: dict[str, int] = dict(conn.execute(select(d.c.state, func.count())
                                       .group_by(d.c.state)).all())
            last_seen = conn.execute(select(func.max(t.c.last_seen))).scalar()
            rollout_states: dict[str, int] = dict(conn.execute(select(r.c.state, func.count())
                                               .group_by(r.c.state)).all())
            active = conn.execute(select(r).where(r.c.state.in_(ro.ACTIVE_STATES))
                                  .order_by(r.c.created_seq)).mappings().all()
            finished = conn.execute(
                select(r).where(r.c.state.not_in(ro.ACTIVE_STATES))
                .order_by(r.c.updated_ts.desc(), r.c.created_seq.desc())
                .limit(self.finished_rollouts)).mappings().all()
            active_ids = [row["rollout"] for row in active]
            per_wave = conn.execute(
                select(rd.c.rollout, rd.c.wave, rd.c.state, func.count())
                .where(rd.c.rollout.in_(active_ids))
                .group_by(rd.c.rollout, rd.c.wave, rd.c.state)).all()

        g = GaugeMetricFamily("fleet_devices", "Enrolled devices by the model version they "
                              "run (empty: none reported yet).", labels=["model", "version"])
        for model, version, n in sorted(running, key=lambda x: (x[0] or "", x[1] or "")):
            g.add_metric([model or "", version or ""], n)
        yield g
        g = GaugeMetricFamily("fleet_device_states", "Enrolled devices by update state (one "
                              "series per state).", labels=["state"])
        for state in sorted(set(DEVICE_STATES) | set(states)):
            g.add_metric([state], states.get(state, 0))
        yield g
        yield GaugeMetricFamily(
            "fleet_device_last_report_timestamp_seconds",
            "Newest report (status or telemetry window end) from any device, Unix time.",
            value=_ns_to_s(last_seen))

        g = GaugeMetricFamily("fleet_rollouts", "Rollouts by state (every rollout ever "
                              "created; one series per state).", labels=["state"])
        for state in sorted(set(ROLLOUT_STATES) | set(rollout_states)):
            g.add_metric([state], rollout_states.get(state, 0))
        yield g
        shown = [*active, *finished]
        info = GaugeMetricFamily(
            "fleet_rollout_info", "Rollouts shown (active ones and the last "
            f"{self.finished_rollouts} finished), 1 each.", labels=["rollout", "model",
                                                                    "version"])
        state_of = GaugeMetricFamily(
            "fleet_rollout_state", "1 for the state the shown rollout is in, 0 for the "
            "others.", labels=["rollout", "state"])
        wave = GaugeMetricFamily("fleet_rollout_current_wave", "The shown rollout's current "
                                 "wave (0-based; -1 before the first).", labels=["rollout"])
        for row in shown:
            info.add_metric([row["rollout"], row["model"], row["version"]], 1)
            for s in sorted(set(ROLLOUT_STATES) | {row["state"]}):
                state_of.add_metric([row["rollout"], s], int(s == row["state"]))
            wave.add_metric([row["rollout"]], row["current_wave"])
        yield from (info, state_of, wave)
        g = GaugeMetricFamily("fleet_rollout_devices", "Devices of active rollouts by wave "
                              "and state in the rollout (one series per state).",
                              labels=["rollout", "wave", "state"])
        counts = {(rid, w, s): n for rid, w, s, n in per_wave}
        for rid, w in sorted({(rid, w) for rid, w, _ in counts}):
            for s in sorted(set(ROLLOUT_DEVICE_STATES)
                            | {s for (r2, w2, s) in counts if (r2, w2) == (rid, w)}):
                g.add_metric([rid, str(w), s], counts.get((rid, w, s), 0))
        yield g

    # ------------------------------------------------------------ telemetry

    def _telemetry(self) -> Iterator[Any]:
        t = self.sources.telemetry
        totals = t.totals_by_model()
        n = CounterMetricFamily("fleet_inferences", "Inferences reported by devices.",
                                labels=["model", "version"])
        e = CounterMetricFamily("fleet_inference_errors", "Failed inferences reported.",
                                labels=["model", "version"])
        for (model, version), (count, errors) in sorted(totals.items()):
            n.add_metric([model, version], count)
            e.add_metric([model, version], errors)
        yield from (n, e)
        h = HistogramMetricFamily(
            "fleet_inference_latency_seconds", "Inference latency on devices (from "
            "telemetry windows; _sum estimated from the buckets).", labels=["model", "version"])
        for (model, version), counts in sorted(t.latency_by_model().items()):
            buckets: list[tuple[str, float]] = []
            cumulative = 0
            for i, bound in enumerate(LATENCY_BUCKETS_MS):
                cumulative += counts[i] if i < len(counts) else 0
                buckets.append((repr(bound / 1000.0), cumulative))
            buckets.append(("+Inf", sum(counts)))
            h.add_metric([model, version], buckets, latency_sum_s(counts))
        yield h
        yield CounterMetricFamily("fleet_telemetry_windows", "Telemetry windows counted, "
                                  "by every hub process (the database's total: the same on "
                                  "each process).", value=t.windows_total)
        yield CounterMetricFamily("fleet_telemetry_windows_counted_here", "Telemetry windows "
                                  "this hub process counted since it started (sum over the "
                                  "processes).", value=t.counted_here)
        yield CounterMetricFamily("fleet_telemetry_duplicates", "Telemetry windows received "
                                  "again and not counted.", value=t.duplicates_total)
        yield CounterMetricFamily("fleet_telemetry_dropped", "Reports devices dropped from "
                                  "full spools (as the devices report it).",
                                  value=t.dropped_total)
        yield GaugeMetricFamily("fleet_telemetry_ingest_lag_seconds", "Time from the end of "
                                "the last ingested window to its ingestion.",
                                value=t.last_lag_s)
        yield GaugeMetricFamily("fleet_telemetry_last_ingest_timestamp_seconds", "When the "
                                "last telemetry window was counted, Unix time (0: none "
                                "since the hub started).", value=_ns_to_s(t.last_ingest_ns))

    # ------------------------------------------------------------ intake and tasks

    def _intake(self) -> Iterator[Any]:
        src = self.sources
        accepted = src.reports_accepted()
        c = CounterMetricFamily("fleet_reports_accepted", "Device reports stored, by kind "
                                "(telemetry, or the status event).", labels=["kind"])
        for kind in sorted(set(REPORT_KINDS) | set(accepted)):
            c.add_metric([kind], accepted.get(kind, 0))
        yield c
        refused = src.reports_refused()
        yield CounterMetricFamily("fleet_reports_refused", "Device reports refused.",
                                  value=sum(refused.values()))
        c = CounterMetricFamily("fleet_reports_refused_by_reason", "Device reports refused, "
                                "by reason (docs/PROTOCOL.md \"Bounds\").", labels=["reason"])
        for reason in sorted(set(src.refusal_reasons) | set(refused)):
            c.add_metric([reason], refused.get(reason, 0))
        yield c
        replies = src.replies_refused()
        c = CounterMetricFamily("fleet_replies_refused", "Requests dropped because of their "
                                "reply subject, by reason (hub/home/replies.py).",
                                labels=["reason"])
        for reason in sorted(set(src.reply_reasons) | set(replies)):
            c.add_metric([reason], replies.get(reason, 0))
        yield c

    def _tasks(self) -> Iterator[Any]:
        tasks = self.sources.tasks()
        up = GaugeMetricFamily("fleet_hub_task_up", "1 if the hub's task is running, 0 if "
                               "restarting, failed or stopped.", labels=["task"])
        restarts = CounterMetricFamily("fleet_hub_task_restarts", "Times the hub's task "
                                       "failed and was started again.", labels=["task"])
        for task in tasks:
            up.add_metric([task["name"]], int(task["state"] == "running"))
            restarts.add_metric([task["name"]], task["restarts"])
        yield from (up, restarts)

    def _ledger(self) -> Iterator[Any]:
        head = self.sources.store.head()
        yield GaugeMetricFamily("fleet_ledger_entries", "Entries in the ledger.",
                                value=0 if head is None else head.seq + 1)
        yield GaugeMetricFamily("fleet_ledger_head_timestamp_seconds", "Time of the newest "
                                "ledger entry, Unix time (0: empty).",
                                value=0.0 if head is None else _ns_to_s(head.ts))


class HubMetrics:
    """One hub's registry: its state's families and the append latency histogram."""

    def __init__(self, sources: MetricSources,
                 finished_rollouts: int = FINISHED_ROLLOUTS_SHOWN) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.append_seconds = Histogram(
            "fleet_ledger_append_seconds", "Time to append one batch of ledger entries "
            "with their state updates (one transaction).", buckets=APPEND_BUCKETS_S,
            registry=self.registry)
        self.registry.register(HubCollector(sources, finished_rollouts))

    def observe_append(self, entries: int, seconds: float) -> None:
        """LedgerWriter's hook: one append of `entries` took `seconds`."""
        self.append_seconds.observe(seconds)

    def render(self) -> str:
        """The page in the Prometheus text format (as `GET /metrics` serves it)."""
        return generate_latest(self.registry).decode()


class MetricsServer:
    """`GET /metrics` over HTTP/1.0 on the event loop (content negotiated by
    prometheus-client: the Prometheus text format or OpenMetrics)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        log.info("metrics on http://%s:%d/metrics", shown, self.port)
        return self.port

    async def run(self) -> None:
        """Serve until cancelled (under the hub's supervisor; binds again if needed)."""
        if self._server is None or not self._server.is_serving():
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def page(self, path: str, accept: str) -> tuple[str, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        if path.split("?")[0] != "/metrics":
            return "404 Not Found", "text/plain", b"not found: try /metrics\n"
        encoder, content_type = choose_encoder(accept)
        return "200 OK", content_type, encoder(self.registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            accept = ""
            while (line := await asyncio.wait_for(reader.readline(), 5)) not in (
                    b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "accept":
                    accept = value.strip()
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET":
                status, ctype, body = self.page(parts[1], accept)
            else:
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except Exception as exc:  # a bad client (or a failed read) must never hurt the hub
            log.warning("metrics request failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
