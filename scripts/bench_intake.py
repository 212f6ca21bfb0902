#!/usr/bin/env python3
"""Telemetry ingest with report intake shared by several `hub serve` processes on one
PostgreSQL (docs/ARCHITECTURE.md "Several hub processes, one leader"), next to a raw
nats-py pull subscriber measured in the same run. Timings printed, never asserted.

    .venv/bin/python scripts/bench_intake.py [--hubs 1,2] [--devices 1000] [--windows 20000]

The telemetry-ingest measure of scripts/bench_fleet.py, with the hub count as the
variable and no rollout: for each entry of --hubs, a fresh PostgreSQL database and home,
that many `hub serve` processes, --devices enrolled devices; the hubs are stopped
(SIGSTOP) while --windows synthetic windows are published to REPORTS, then the time from
SIGCONT until the database counts them all (read from PostgreSQL directly, so no hub is
asked), and how many each process counted (from `status`, asked until each answered).
The raw baseline (bench_fleet.raw_ingest: fetch 256 + decode + ack) drains the same
number of messages from a stream of its own, after each hub measure, on the same
nats-server. PostgreSQL runs with fsync on (tests.pg.PgServer(durable=True)).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import nats  # noqa: E402
from bench_fleet import ProcWatch, publish_all, raw_ingest, synthetic_windows  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402

from hub.client import HubClient  # noqa: E402
from hub.home.config import init_home  # noqa: E402
from hub.telemetry.ingest import DEVS  # noqa: E402
from ledger.signing import SigningKey  # noqa: E402
from testkit.nats_server import EmbeddedNats  # noqa: E402
from tests.pg import PgServer  # noqa: E402


async def until(check: Any, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)


async def one_run(hubs: int, args: argparse.Namespace, pg: PgServer, tmp: Path
                  ) -> dict[str, Any]:
    server = EmbeddedNats(store_dir=tmp / f"nats-{hubs}").start()
    url = pg.create_database()
    config = init_home(tmp / f"hub-{hubs}", server.url)
    path = config.home / "config.toml"
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("database")]
    path.write_text("\n".join([*lines, f'database = "{url}"']) + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs: list[subprocess.Popen[bytes]] = []
    engine = create_engine(url)
    result: dict[str, Any] = {"hubs": hubs}
    try:
        def start_hub(k: int) -> None:
            with open(tmp / f"hub-{hubs}-{k}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "hub.cli", "serve", "--home", str(config.home),
                     "--log-level", "WARNING"], env=env, stdout=subprocess.DEVNULL,
                    stderr=log))

        # The devices are enrolled through the first hub alone, before the others start
        # (two processes rewriting one home's NATS users file at once is not measured).
        start_hub(0)
        key = SigningKey.load(config.operator_key_path("admin"))
        admin = await HubClient.connect(server.url, key, timeout=60)

        async def serving(n: int) -> bool:
            with contextlib.suppress(Exception):
                status = await admin.call("status")
                return len(status["leadership"]["processes"]) >= n or hubs == 1
            return False

        await until(lambda: serving(1), 120, "the first hub to serve", every=0.5)
        devices = [f"bi-{i:05d}" for i in range(args.devices)]
        for i in range(0, len(devices), 50):
            await asyncio.gather(*(admin.call("device.enroll", {"device": d})
                                   for d in devices[i:i + 50]))
        for k in range(1, hubs):
            start_hub(k)
        pids = {p.pid for p in procs}
        await until(lambda: serving(hubs), 120, "every hub process to serve", every=0.5)
        msgs = synthetic_windows(devices, args.windows)
        watches = [ProcWatch(p.pid) for p in procs]
        nc = await nats.connect(server.url)
        for p in procs:
            os.kill(p.pid, signal.SIGSTOP)
        try:
            t = time.perf_counter()
            await publish_all(nc.jetstream(), msgs)
            result["publish_s"] = time.perf_counter() - t
        finally:
            for p in procs:
                os.kill(p.pid, signal.SIGCONT)
        cpu0 = [w.cpu() for w in watches]
        t = time.perf_counter()

        def counted() -> int:
            with engine.connect() as conn:
                return int(conn.execute(
                    select(func.coalesce(func.sum(DEVS.c.windows), 0))).scalar_one())

        async def done() -> bool:
            return await asyncio.to_thread(counted) >= len(msgs)

        await until(done, 900, "telemetry ingest")
        elapsed = time.perf_counter() - t
        result["ingest_msgs_s"] = len(msgs) / elapsed
        result["ingest_s"] = elapsed
        result["cpu"] = [(w.cpu() - c) / elapsed for w, c in zip(watches, cpu0, strict=True)]
        assert counted() == len(msgs), (counted(), len(msgs))  # once each, not more
        split: dict[int, int] = {}
        deadline = time.monotonic() + 30
        while set(split) != pids and time.monotonic() < deadline:
            status = await admin.call("status")
            mine = (status.get("intake") or {}).get("this_process") or {}  # older hubs: none
            split[int(status["leadership"]["this"]["pid"])] = int(mine.get("windows_counted", -1))
        result["split"] = [split.get(p.pid, -1) for p in procs]
        await nc.close()
        await admin.close()
        result["raw_msgs_s"] = await raw_ingest(server.url, msgs)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        engine.dispose()
        server.close()
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"{args.windows:,} windows from {args.devices:,} devices; PostgreSQL with fsync; "
          f"load before the run: {args.load}")
    print("| hub processes | hub ingest | raw pull subscriber (same run) | ratio | "
          "windows counted per process | hub CPU per process |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['hubs']} | {r['ingest_msgs_s']:,.0f} msg/s ({r['ingest_s']:.1f} s) | "
              f"{r['raw_msgs_s']:,.0f} msg/s | {r['ingest_msgs_s'] / r['raw_msgs_s']:.2f}x | "
              f"{' / '.join(f'{n:,}' for n in r['split'])} | "
              f"{' / '.join(f'{c * 100:.0f}%' for c in r['cpu'])} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--hubs", default="1,2", help="hub process counts to run, in order")
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--windows", type=int, default=20000)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    args.load = Path("/proc/loadavg").read_text().split()[:3]
    tmp = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    pg = PgServer(durable=True).start()
    results = []
    try:
        for hubs in (int(h) for h in args.hubs.split(",")):
            results.append(asyncio.run(one_run(hubs, args, pg, tmp)))
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
