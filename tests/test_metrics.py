"""The hub's Prometheus page, scraped over HTTP from a running hub (real nats-server, real
hub with `metrics_listen` in its config.toml) and parsed with prometheus-client's own
parser: every family is there, histograms have `_bucket`/`_sum`/`_count`, a time is
exact to the second, and the number of series stays bounded however many rollouts come
and go."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edge_agent import protocol as proto
from edge_agent.protocol import SignedEnvelope
from edge_agent.protocol.bins import LATENCY_BUCKETS_MS
from hub.home.config import CONFIG_NAME, HubConfig, init_home, parse_listen
from hub.telemetry.metrics import FINISHED_ROLLOUTS_SHOWN, latency_sum_s
from ledger.encoding import canonical_encode
from ledger.signing import SigningKey
from tests.fleet import Fleet

WAIT = 20.0

FAMILIES = {  # name (as the parser names it) -> type
    "fleet_devices": "gauge", "fleet_device_states": "gauge",
    "fleet_device_last_report_timestamp_seconds": "gauge", "fleet_rollouts": "gauge",
    "fleet_rollout_info": "gauge", "fleet_rollout_state": "gauge",
    "fleet_rollout_current_wave": "gauge", "fleet_rollout_devices": "gauge",
    "fleet_inferences": "counter", "fleet_inference_errors": "counter",
    "fleet_inference_latency_seconds": "histogram", "fleet_telemetry_windows": "counter",
    "fleet_telemetry_windows_counted_here": "counter",
    "fleet_telemetry_duplicates": "counter", "fleet_telemetry_dropped": "counter",
    "fleet_telemetry_ingest_lag_seconds": "gauge",
    "fleet_telemetry_last_ingest_timestamp_seconds": "gauge",
    "fleet_reports_accepted": "counter", "fleet_reports_refused": "counter",
    "fleet_reports_refused_by_reason": "counter", "fleet_replies_refused": "counter",
    "fleet_hub_task_up": "gauge", "fleet_hub_task_restarts": "counter",
    "fleet_ledger_entries": "gauge", "fleet_ledger_head_timestamp_seconds": "gauge",
    "fleet_ledger_append_seconds": "histogram",
}


@pytest.fixture
def hub_home(tmp_path: Path) -> HubConfig:
    """The conftest's hub home, serving metrics on a free port of 127.0.0.1."""
    config = init_home(tmp_path / "hub", "nats://127.0.0.1:4222")
    with open(config.home / CONFIG_NAME, "a") as f:
        f.write('metrics_listen = "127.0.0.1:0"\n')
    return config


def scrape(fleet: Fleet) -> dict[str, Any]:
    """GET /metrics of the running hub, parsed: name -> family."""
    server = fleet.hub.metrics_server
    assert server is not None, "metrics_listen in config.toml did not start the server"
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families: dict[str, Any], name: str) -> list[Sample]:
    return list(families[name].samples)


def value(families: dict[str, Any], family: str, sample: str | None = None,
          **labels: str) -> float:
    want = sample or family
    found = [s.value for s in families[family].samples
             if s.name == want and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (want, labels, families[family].samples)
    return float(found[0])


async def until(fleet: Fleet, check: Callable[[dict[str, Any]], bool], what: str
                ) -> dict[str, Any]:
    """Scrape until `check` holds (the event), at most WAIT seconds."""
    async def loop() -> dict[str, Any]:
        while not check(families := await asyncio.to_thread(scrape, fleet)):
            await asyncio.sleep(0.05)
        return families

    try:
        return await asyncio.wait_for(loop(), WAIT)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def publish(fleet: Fleet, subject: str, data: bytes) -> None:
    nc = await fleet.connect("hub", name="test-reports")
    try:
        await nc.jetstream().publish(subject, data)
    finally:
        await nc.close()


def signed_started(fleet: Fleet, device: str, ts: int) -> bytes:
    report = proto.StatusReport(
        device=device, boot="boot-1", seq=1, ts=ts, event=proto.STATUS_STARTED, model="",
        version="", digest="", counter=0, reason="", probe_output=[])
    key = SigningKey.load(fleet.bundle(device) / "device.key")
    return SignedEnvelope.sign(report.to_map(), proto.DOMAIN_DEVICE_REPORT, [key]).encode()


def window(device: str, buckets: list[int]) -> bytes:
    end = time.time_ns() - 10 * 10**9  # older than the status report below
    return canonical_encode(proto.TelemetryWindow(
        device=device, boot="boot-1", seq=1, model="kws", version="1", digest="ab" * 32,
        start=end - 10**9, end=end, count=sum(buckets), errors=1, latency_ms_p50=1.0,
        latency_ms_p95=2.0, latency_ms_max=3.0, latency_buckets=buckets).to_map())


async def test_a_running_hub_serves_every_family_exactly(fleet: Fleet) -> None:
    async with await fleet.client() as admin:
        await admin.call("device.enroll", {"device": "dev-1"})
    buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    buckets[4], buckets[9], buckets[-1] = 7, 2, 1  # 0.5-1 ms, 25-50 ms, over 1 s
    await publish(fleet, "fleet.report.dev-1.telemetry", window("dev-1", buckets))
    await until(fleet, lambda f: value(f, "fleet_telemetry_windows",
                                       "fleet_telemetry_windows_total") == 1, "the window")
    ts = (time.time_ns() // 10**9 - 1) * 10**9 + 987_654_321
    await publish(fleet, "fleet.report.dev-1.status", signed_started(fleet, "dev-1", ts))
    await publish(fleet, "fleet.report.ghost.status", b"\x00not a report")

    def settled(f: dict[str, Any]) -> bool:
        return (value(f, "fleet_reports_accepted", "fleet_reports_accepted_total",
                      kind="started") == 1
                and value(f, "fleet_reports_accepted", "fleet_reports_accepted_total",
                          kind="telemetry") == 1
                and value(f, "fleet_reports_refused", "fleet_reports_refused_total") == 1)

    f = await until(fleet, settled, "the three reports to be counted")
    assert {name: fam.type for name, fam in f.items() if name in FAMILIES} == FAMILIES
    # Full precision: the device's report time to well under a second (printed with 6
    # digits, as the hand-written page did, it was off by up to ~5,000 s).
    last = value(f, "fleet_device_last_report_timestamp_seconds")
    assert int(last) == ts // 10**9 and abs(last - ts / 1e9) < 1e-3, (last, ts)
    head = fleet.hub.store.head()
    assert head is not None
    assert value(f, "fleet_ledger_entries") == head.seq + 1
    assert int(value(f, "fleet_ledger_head_timestamp_seconds")) == head.ts // 10**9
    # Histograms with _bucket, _sum and _count.
    lat = {"model": "kws", "version": "1"}
    assert value(f, "fleet_inference_latency_seconds", "fleet_inference_latency_seconds_count",
                 **lat) == 10
    assert value(f, "fleet_inference_latency_seconds", "fleet_inference_latency_seconds_bucket",
                 le="0.001", **lat) == 7
    assert value(f, "fleet_inference_latency_seconds", "fleet_inference_latency_seconds_bucket",
                 le="+Inf", **lat) == 10
    assert value(f, "fleet_inference_latency_seconds", "fleet_inference_latency_seconds_sum",
                 **lat) == pytest.approx(latency_sum_s(buckets))
    assert value(f, "fleet_inference_errors", "fleet_inference_errors_total", **lat) == 1
    appends = value(f, "fleet_ledger_append_seconds", "fleet_ledger_append_seconds_count")
    assert appends >= 2  # at least the operator.add and the enrolment
    assert value(f, "fleet_ledger_append_seconds", "fleet_ledger_append_seconds_sum") > 0
    assert value(f, "fleet_ledger_append_seconds", "fleet_ledger_append_seconds_bucket",
                 le="+Inf") == appends
    # Refusals by reason: every reason has its series from the start.
    assert value(f, "fleet_reports_refused_by_reason",
                 "fleet_reports_refused_by_reason_total", reason="malformed") == 1
    assert value(f, "fleet_reports_refused_by_reason",
                 "fleet_reports_refused_by_reason_total", reason="rate") == 0
    assert value(f, "fleet_replies_refused", "fleet_replies_refused_total",
                 reason="wildcard") == 0
    # Task health; a device state is one series per state, holding a count.
    assert value(f, "fleet_hub_task_up", task="reports") == 1
    assert value(f, "fleet_hub_task_restarts", "fleet_hub_task_restarts_total",
                 task="reports") == 0
    assert value(f, "fleet_device_states", state="enrolled") == 1
    assert value(f, "fleet_device_states", state="revoked") == 0
    # The registry is the hub's own: a second scrape adds no series.
    again = await asyncio.to_thread(scrape, fleet)
    assert sum(len(x.samples) for x in again.values()) == sum(len(x.samples) for x in f.values())


async def test_rollouts_shown_stay_bounded(fleet: Fleet, model_files: dict[str, Path]
                                           ) -> None:
    await fleet.release_model(model_files["1"], "kws", "1")
    async with await fleet.client() as admin:
        await admin.call("device.enroll", {"device": "dev-1"})
        await admin.call("device.tag", {"device": "dev-1", "group": "lab", "tags": {}})

        async def rollout(abort: bool) -> str:
            rid = str((await admin.call("rollout.create", {
                "model": "kws", "version": "1", "target": "group=lab", "waves": "100%",
                "min_success": 1.0, "max_failure": 0.0, "deadline": "60s"}))["rollout"])
            if abort:
                await admin.call("rollout.abort", {"rollout": rid, "reason": "test"})
            return rid

        def series(f: dict[str, Any]) -> int:
            return sum(len(x.samples) for x in f.values())

        finished = [await rollout(abort=True) for _ in range(FINISHED_ROLLOUTS_SHOWN)]
        full = await asyncio.to_thread(scrape, fleet)
        for _ in range(FINISHED_ROLLOUTS_SHOWN + 5):  # many more come and go
            finished.append(await rollout(abort=True))
        active = await rollout(abort=False)
        f = await asyncio.to_thread(scrape, fleet)
    shown = {s.labels["rollout"] for s in samples(f, "fleet_rollout_info")}
    # The active one and the newest finished ones; the older ones are gone.
    assert shown == {active, *finished[-FINISHED_ROLLOUTS_SHOWN:]}
    assert value(f, "fleet_rollouts", state="aborted") == len(finished)
    assert value(f, "fleet_rollout_state", rollout=active, state="created") == 1
    assert value(f, "fleet_rollout_state", rollout=active, state="aborted") == 0
    assert value(f, "fleet_rollout_devices", rollout=active, wave="0", state="planned") == 1
    # One more rollout shown (the active one) and its devices: the page did not grow
    # with the 15 rollouts that finished meanwhile.
    per_rollout = len([s for s in samples(f, "fleet_rollout_state")
                       if s.labels["rollout"] == active])
    devices = len(samples(f, "fleet_rollout_devices"))
    assert series(f) <= series(full) + 2 + per_rollout + devices + 5  # + append buckets
    assert len(samples(f, "fleet_rollout_info")) == FINISHED_ROLLOUTS_SHOWN + 1


@pytest.mark.parametrize(("text", "parsed"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:9464", ("::1", 9464)), ("9464", ("127.0.0.1", 9464)),
])
def test_listen_addresses(text: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(text) == parsed


@pytest.mark.parametrize("text", ["", ":9464", "host:", "host:port", "1.2.3.4:70000"])
def test_bad_listen_addresses_say_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="use ADDR:PORT"):
        parse_listen(text)


def test_metrics_port_in_config_still_means_localhost(tmp_path: Path) -> None:
    from hub.home.config import load_config

    config = init_home(tmp_path / "hub", "nats://127.0.0.1:4222")
    with open(config.home / CONFIG_NAME, "a") as f:
        f.write("metrics_port = 9464\n")
    assert load_config(config.home).metrics_listen == "127.0.0.1:9464"

