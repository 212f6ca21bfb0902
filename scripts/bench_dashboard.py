#!/usr/bin/env python3
"""Dashboard benchmark: server time of every page at 10,000 devices, next to the raw SQL
the page needs, measured in the same run. Timings are printed, never asserted.

    .venv/bin/python scripts/bench_dashboard.py [--devices 10000] [--rounds 20]

The hub (hub.service.app.HubService, offline: no NATS) gets a real SQLite ledger built
through its own writer and fold: --devices enrolled and tagged devices that all run
kws/1 (assignment + applied report each), two registered, validated and approved
versions, and a rollout of kws/2 to every device in waves of 1%, 9%, 40%, 50%: two
waves done with their gate evidence, the third rolling (its devices assigned, half of
them applied), the last planned. A checkpoint is signed so entry pages carry a proof.

Each page is requested --rounds times through the ASGI app in this process
(httpx.ASGITransport: routing, reads, template rendering, the token gate; no socket), so
the time is the server's. The raw baseline runs the SQL statements the page's data
needs on a plain `sqlite3` connection to the same file (no ORM, no rendering); "x raw"
is the ratio of the medians.

Telemetry aggregates are empty in this build (no agents): the rollout page still looks
up every member's aggregate, which is the part that grows with the fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from hub import events as ev  # noqa: E402
from hub.home.config import init_home  # noqa: E402
from hub.log.checkpointer import Checkpointer  # noqa: E402
from hub.service.app import HubService  # noqa: E402
from hub.web.app import create_app  # noqa: E402
from hub.web.data import DashboardSources  # noqa: E402
from ledger.signing import SigningKey  # noqa: E402
from ledger.storage.store import NewEvent  # noqa: E402

CHUNK = 2000
TOKEN = "bench-token-0123456789abcdef"


async def build(hub: HubService, n: int) -> dict[str, Any]:
    """The fleet, registry and rollout described in the module docstring."""
    write = hub.writer.write
    ids = [f"dev-{i:05d}" for i in range(n)]
    public = SigningKey.generate().public.raw
    for i in range(0, n, CHUNK):
        part = ids[i:i + CHUNK]
        await write([NewEvent(ev.DEVICE_ENROLLED, "hub", ev.device_subject(d),
                              {"device": d, "public": public}) for d in part]
                    + [NewEvent(ev.DEVICE_TAGGED, "admin", ev.device_subject(d),
                                {"device": d, "group": "lab", "tags": {"site": f"s{j % 7}"}})
                       for j, d in enumerate(part)])
    for version in ("1", "2"):
        subject = ev.model_subject("kws", version)
        release = {"name": "kws", "version": version}
        await write([
            NewEvent(ev.MODEL_REGISTERED, "admin", subject, {
                **release, "digest": version * 64, "size": 250_000,
                "lineage": {"parent": "kws/1" if version == "2" else ""},
                "card": {"intended_use": "keyword spotting"}}),
            NewEvent(ev.MODEL_VALIDATED, "admin", subject, {
                **release, "passed": True, "failures": [], "policy": {"min_accuracy": 0.8},
                "metrics": {"accuracy": 0.91, "latency_p95_ms": 3.2, "flip_rate": 0.01}}),
            NewEvent(ev.MODEL_APPROVED, "approver", subject, release),
        ])
    for i in range(0, n, CHUNK):
        part = ids[i:i + CHUNK]
        await write([NewEvent(ev.DEVICE_ASSIGNED, "hub", ev.device_subject(d), {
            "device": d, "model": "kws", "version": "1", "counter": 1}) for d in part]
            + [NewEvent(ev.DEVICE_UPDATE_APPLIED, d, ev.device_subject(d), {
                "device": d, "model": "kws", "version": "1", "digest": "1" * 64,
                "counter": 1, "boot": "b1", "report_seq": 1}) for d in part])
    rid = "r-bench"
    sizes = [n // 100, n * 9 // 100, n * 40 // 100]
    sizes.append(n - sum(sizes))
    subject = ev.rollout_subject(rid)
    await write([
        NewEvent(ev.ROLLOUT_CREATED, "admin", subject, {
            "rollout": rid, "model": "kws", "version": "2", "digest": "2" * 64,
            "manifest_hash": "ab" * 32, "target": "group=lab",
            "waves": ["1%", "10%", "50%", "100%"],
            "policy": {"max_error_rate": 0.05, "max_p95_ms": 40.0, "max_psi": 0.25},
            "devices": ids, "wave_sizes": sizes}),
        NewEvent(ev.ROLLOUT_STARTED, "admin", subject, {"rollout": rid})])
    start = 0
    for wave, size in enumerate(sizes[:3]):
        members = ids[start:start + size]
        start += size
        await write([NewEvent(ev.ROLLOUT_WAVE_STARTED, "hub", subject,
                              {"rollout": rid, "wave": wave, "devices": members})])
        applied = members if wave < 2 else members[: size // 2]
        for i in range(0, size, CHUNK):
            await write([NewEvent(ev.DEVICE_ASSIGNED, "hub", ev.device_subject(d), {
                "device": d, "model": "kws", "version": "2", "counter": 2, "rollout": rid,
                "previous_model": "kws", "previous_version": "1"})
                for d in members[i:i + CHUNK]])
        for i in range(0, len(applied), CHUNK):
            await write([NewEvent(ev.DEVICE_UPDATE_APPLIED, d, ev.device_subject(d), {
                "device": d, "model": "kws", "version": "2", "digest": "2" * 64,
                "counter": 2, "boot": "b1", "report_seq": 2}) for d in applied[i:i + CHUNK]])
        if wave < 2:
            evidence = {"devices": size, "applied": size, "failed": 0,
                        "error_rate": 0.002 * (wave + 1), "p95_ms": 11.0 + wave,
                        "psi": 0.03 * (wave + 1), "inferences": 1000 * size}
            await write([
                NewEvent(ev.ROLLOUT_WAVE_BAKING, "hub", subject,
                         {"rollout": rid, "wave": wave, "evidence": evidence}),
                NewEvent(ev.ROLLOUT_WAVE_COMPLETED, "hub", subject,
                         {"rollout": rid, "wave": wave, "evidence": evidence})])
    size = await Checkpointer.from_config(hub.config, hub.store).sign_now()
    return {"rollout": rid, "device": ids[n // 2], "entries": hub.store.count(),
            "checkpoint": size.size if size else 0}


def raw_queries(built: dict[str, Any]) -> dict[str, list[tuple[str, tuple[Any, ...]]]]:
    """Per page: the SQL its data needs, as a person would write it by hand."""
    rid, dev = built["rollout"], built["device"]
    entries_by_subject = ("SELECT seq, body FROM ledger_entries WHERE subject = ? "
                          "ORDER BY seq DESC LIMIT 51")
    return {
        "overview": [
            ("SELECT state, count(*) FROM proj_devices GROUP BY state", ()),
            ("SELECT model, version, count(*) FROM proj_devices GROUP BY model, version", ()),
            ("SELECT rollout, state, count(*) FROM proj_rollout_devices "
             "GROUP BY rollout, state", ()),
            ("SELECT * FROM proj_rollouts ORDER BY created_seq DESC LIMIT 10", ()),
            ("SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1", ())],
        "devices (page 100)": [
            ("SELECT d.*, t.last_seen, t.inferences, t.errors, t.latency_ms_p95 "
             "FROM proj_devices d LEFT JOIN device_telemetry t ON d.device = t.device "
             "ORDER BY d.device LIMIT 51 OFFSET 5000", ()),
            ("SELECT state, count(*) FROM proj_devices GROUP BY state", ())],
        "device": [
            ("SELECT * FROM proj_devices WHERE device = ?", (dev,)),
            ("SELECT * FROM proj_device_tags WHERE device = ?", (dev,)),
            ("SELECT * FROM device_telemetry WHERE device = ?", (dev,)),
            (entries_by_subject, (ev.device_subject(dev),))],
        "rollout": [
            ("SELECT * FROM proj_rollouts WHERE rollout = ?", (rid,)),
            ("SELECT wave, device, state, counter FROM proj_rollout_devices "
             "WHERE rollout = ?", (rid,)),
            ("SELECT * FROM proj_rollout_waves WHERE rollout = ?", (rid,)),
            (entries_by_subject, (ev.rollout_subject(rid),)),
            ("SELECT device, wave, state, reason, updated_ts FROM proj_rollout_devices "
             "WHERE rollout = ? ORDER BY wave, device LIMIT 51", (rid,))],
        "rollout progress.json": [
            ("SELECT * FROM proj_rollouts WHERE rollout = ?", (rid,)),
            ("SELECT wave, state, count(*) FROM proj_rollout_devices WHERE rollout = ? "
             "GROUP BY wave, state", (rid,)),
            ("SELECT * FROM proj_rollout_waves WHERE rollout = ?", (rid,))],
        "models": [("SELECT * FROM proj_releases", ()),
                   ("SELECT * FROM proj_operators", ())],
        "model": [("SELECT * FROM proj_releases WHERE name = ? AND version = ?", ("kws", "2")),
                  (entries_by_subject.replace("DESC ", ""), (ev.model_subject("kws", "2"),))],
        "ledger (newest)": [
            ("SELECT seq, body FROM ledger_entries ORDER BY seq DESC LIMIT 51", ())],
        "ledger kind=rollout.*": [
            ("SELECT seq, body FROM ledger_entries WHERE kind LIKE 'rollout.%' "
             "ORDER BY seq DESC LIMIT 51", ())],
        "ledger actor=admin": [
            ("SELECT seq, body FROM ledger_entries WHERE actor = ? ORDER BY seq DESC "
             "LIMIT 51", ("admin",))],
        "ledger subject=device:…": [(entries_by_subject, (ev.device_subject(dev),))],
        "entry + proof": [("SELECT body FROM ledger_entries WHERE seq = ?", (7,))],
    }


def pages(built: dict[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    rid, dev = built["rollout"], built["device"]
    return {
        "overview": ("/", {}),
        "devices (page 100)": ("/devices", {"offset": "5000"}),
        "device": ("/device", {"id": dev}),
        "rollout": ("/rollout", {"id": rid}),
        "rollout progress.json": ("/rollout/progress.json", {"id": rid}),
        "models": ("/models", {}),
        "model": ("/model", {"name": "kws", "version": "2"}),
        "ledger (newest)": ("/ledger", {}),
        "ledger kind=rollout.*": ("/ledger", {"kind": "rollout.*"}),
        "ledger actor=admin": ("/ledger", {"actor": "admin"}),
        "ledger subject=device:…": ("/ledger", {"subject": ev.device_subject(dev)}),
        "entry + proof": ("/entry", {"seq": "7"}),
    }


def timed(rounds: int, fn: Callable[[], Any]) -> list[float]:
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        config = init_home(Path(tmp) / "hub", "nats://127.0.0.1:1", "ledger.db", False,
                           nats_auth=False)
        hub = HubService(config)
        started = time.perf_counter()
        built = await build(hub, args.devices)
        print(f"built {args.devices:,} devices, {built['entries']:,} ledger entries, "
              f"checkpoint of {built['checkpoint']:,} in {time.perf_counter() - started:.1f} s")
        checkpoints = Checkpointer.from_config(config, hub.store).checkpoints
        src = DashboardSources(store=hub.store, telemetry=hub.telemetry,
                               status=hub.status_map, checkpoints=lambda: checkpoints,
                               home=config.home)
        app = create_app(src, TOKEN)  # with the token gate: what an exposed hub runs
        raw = sqlite3.connect(Path(config.home) / "ledger.db")
        queries = raw_queries(built)
        rows = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://hub",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            for name, (path, params) in pages(built).items():
                first = await client.get(path, params=params)  # warm caches, check it
                assert first.status_code == 200, (name, first.status_code, first.text[:300])
                times = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    response = await client.get(path, params=params)
                    times.append(time.perf_counter() - t0)
                    assert response.status_code == 200
                statements = queries[name]
                raw_times = timed(args.rounds, lambda s=statements: [  # type: ignore[misc]
                    raw.execute(sql, p).fetchall() for sql, p in s])
                rows.append((name, statistics.median(times), max(times),
                             statistics.median(raw_times), len(first.content)))
        raw.close()
        hub.store.close()
    print(f"\n{'page':26} {'median ms':>10} {'max ms':>8} {'raw SQL ms':>11} {'x raw':>7} "
          f"{'KiB':>6}")
    for name, median, worst, raw_median, size in rows:
        print(f"{name:26} {median * 1e3:10.1f} {worst * 1e3:8.1f} {raw_median * 1e3:11.2f} "
              f"{median / raw_median:7.1f} {size / 1024:6.1f}")


if __name__ == "__main__":
    asyncio.run(main())
