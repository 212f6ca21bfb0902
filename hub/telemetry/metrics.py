"""Prometheus metrics of the hub on `GET /metrics` (text exposition format 0.0.4).

A tiny asyncio HTTP/1.0 server on 127.0.0.1 (port from config.toml `metrics_port` or
`hub serve --metrics-port`; 0 = off). `render` is a pure function of the hub's state,
so tests can check the text without a socket; the server is handed a callable that
renders the page, so it knows nothing of the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from edge_agent.protocol.bins import LATENCY_BUCKETS_MS
from hub.devices import state as device_state
from hub.rollouts import rules as ro
from hub.rollouts import state as rs
from hub.telemetry.ingest import TelemetryIngest
from ledger.storage.store import LedgerStore

log = logging.getLogger("hub.metrics")


def _labels(**labels: object) -> str:
    def esc(v: object) -> str:
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: object) -> None:
        text = _labels(**labels) if labels else ""
        self.lines.append(f"{name}{text} {value:g}" if isinstance(value, float)
                          else f"{name}{text} {value}")


def render(store: LedgerStore, telemetry: TelemetryIngest, refused_reports: int,
           refused_by_reason: dict[str, int] | None = None,
           tasks: list[dict[str, Any]] | None = None) -> str:
    out = _Out()
    with store.engine.connect() as conn:
        devices = device_state.list_devices(conn)
        rollouts = rs.list_rollouts(conn)
        rollout_rows = {r["rollout"]: rs.list_rollout_devices(conn, r["rollout"])
                        for r in rollouts if r["state"] in ro.ACTIVE_STATES}
    running = Counter((d["model"] or "", d["version"] or "") for d in devices)
    out.family("fleet_devices", "gauge", "Enrolled devices by the model version they run.")
    for (model, version), n in sorted(running.items()):
        out.sample("fleet_devices", n, model=model, version=version)
    state_counts = Counter(d["state"] for d in devices)
    out.family("fleet_device_states", "gauge", "Enrolled devices by update state.")
    for state, n in sorted(state_counts.items()):
        out.sample("fleet_device_states", n, state=state)

    out.family("fleet_rollout_info", "gauge", "Rollouts (1 per rollout) with their state.")
    for r in rollouts:
        out.sample("fleet_rollout_info", 1, rollout=r["rollout"], model=r["model"],
                   version=r["version"], state=r["state"])
    out.family("fleet_rollout_devices", "gauge",
               "Devices of active rollouts by wave and state.")
    for rid, rows in sorted(rollout_rows.items()):
        per = Counter((row["wave"], row["state"]) for row in rows)
        for (wave, state), n in sorted(per.items()):
            out.sample("fleet_rollout_devices", n, rollout=rid, wave=wave, state=state)

    t = telemetry
    totals = t.totals_by_model()
    out.family("fleet_inferences_total", "counter", "Inferences reported by devices.")
    for (model, version), (n, _) in sorted(totals.items()):
        out.sample("fleet_inferences_total", n, model=model, version=version)
    out.family("fleet_inference_errors_total", "counter", "Failed inferences reported.")
    for (model, version), (_, e) in sorted(totals.items()):
        out.sample("fleet_inference_errors_total", e, model=model, version=version)
    out.family("fleet_inference_latency_seconds", "histogram",
               "Inference latency on devices (from telemetry windows).")
    for (model, version), counts in sorted(t.latency_by_model().items()):
        cumulative = 0
        for i, bound in enumerate(LATENCY_BUCKETS_MS):
            cumulative += counts[i] if i < len(counts) else 0
            out.sample("fleet_inference_latency_seconds_bucket", cumulative, model=model,
                       version=version, le=f"{bound / 1000.0:g}")
        total = sum(counts)
        out.sample("fleet_inference_latency_seconds_bucket", total, model=model,
                   version=version, le="+Inf")
        out.sample("fleet_inference_latency_seconds_count", total, model=model,
                   version=version)
    out.family("fleet_telemetry_windows_total", "counter", "Telemetry windows counted.")
    out.sample("fleet_telemetry_windows_total", t.windows_total)
    out.family("fleet_telemetry_duplicates_total", "counter",
               "Telemetry windows received again and not counted.")
    out.sample("fleet_telemetry_duplicates_total", t.duplicates_total)
    out.family("fleet_telemetry_dropped_total", "counter",
               "Reports devices dropped from full spools (as the devices report it).")
    out.sample("fleet_telemetry_dropped_total", t.dropped_total)
    out.family("fleet_telemetry_ingest_lag_seconds", "gauge",
               "Time from the end of the last ingested window to its ingestion.")
    out.sample("fleet_telemetry_ingest_lag_seconds", round(t.last_lag_s, 6))
    out.family("fleet_reports_refused_total", "counter", "Device reports refused.")
    out.sample("fleet_reports_refused_total", refused_reports)
    if refused_by_reason:
        out.family("fleet_reports_refused_by_reason_total", "counter",
                   "Device reports refused, by reason (docs/PROTOCOL.md \"Bounds\").")
        for reason, n in sorted(refused_by_reason.items()):
            out.sample("fleet_reports_refused_by_reason_total", n, reason=reason)
    if tasks:
        out.family("fleet_hub_task_up", "gauge",
                   "1 if the hub's task is running, 0 if restarting, failed or stopped.")
        for task in tasks:
            out.sample("fleet_hub_task_up", int(task["state"] == "running"),
                       task=task["name"])
        out.family("fleet_hub_task_restarts_total", "counter",
                   "Times the hub's task failed and was started again.")
        for task in tasks:
            out.sample("fleet_hub_task_restarts_total", task["restarts"], task=task["name"])
    head = store.head()
    out.family("fleet_ledger_entries", "gauge", "Entries in the ledger.")
    out.sample("fleet_ledger_entries", 0 if head is None else head.seq + 1)
    out.family("fleet_scrape_timestamp_seconds", "gauge", "When this page was made.")
    out.sample("fleet_scrape_timestamp_seconds", round(time.time(), 3))
    return "\n".join(out.lines) + "\n"


class MetricsServer:
    def __init__(self, render: Callable[[], str], port: int, host: str = "127.0.0.1") -> None:
        self.render = render
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body = self.render().encode()
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except Exception as exc:  # a bad client must never hurt the hub
            log.debug("metrics request failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
