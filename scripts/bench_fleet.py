#!/usr/bin/env python3
"""Fleet benchmark: a rollout to N simulated devices, model fetch and telemetry ingest,
each next to a raw baseline measured in the same run. Timings are printed, never asserted.

    .venv/bin/python scripts/bench_fleet.py [--devices 1000] [--model-mib 1]

- the hub runs as its own process (`hub serve`), so its CPU and RSS are its own;
- the devices are testkit.fleet_sim agents (real EdgeAgents, real TFLite), sharded over
  --procs OS processes (default: one per core) by testkit.fleet_sim.ShardedFleet;
- converge: `hub rollout create --waves 1%,10%,50%,100%` (no bake, no gates) of a
  model of --model-mib, from `rollout start` to every device applied;
- fetch: bytes the agents downloaded during the update / the time at least one model
  transfer was in progress (union of the agents' download intervals: no wave pacing,
  no controller ticks), next to raw pull-consumer reads of the same object
  (edge_agent.fetch, 32 concurrent readers, median of 5 rounds) from this process,
  while the fleet runs; bytes / converge time is printed too;
- ingest: synthetic telemetry windows published to the REPORTS stream while the hub is
  stopped (SIGSTOP), then the time from SIGCONT until the hub has counted them all, next
  to a raw nats-py pull subscriber (fetch 256 + decode + ack) draining the same number of
  messages from a stream of its own, filled beforehand the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import blake3  # noqa: E402
import nats  # noqa: E402
from nats.js.api import StreamConfig  # noqa: E402

from edge_agent import protocol as proto  # noqa: E402
from edge_agent.transport.objects import iter_object_chunks  # noqa: E402
from hub.client import HubClient  # noqa: E402
from hub.errors import HubError  # noqa: E402
from hub.home.config import init_home  # noqa: E402
from ledger.signing import SigningKey  # noqa: E402
from testkit.fleet_sim import ShardedFleet, SimFleet, transfer_rate  # noqa: E402
from testkit.modelgen import model_for_version, write_validation_set  # noqa: E402
from testkit.nats_server import EmbeddedNats  # noqa: E402


class ProcWatch:
    """CPU seconds and peak RSS of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_mib = 0.0
        self._task: asyncio.Task[None] | None = None

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak_rss_mib = max(self.peak_rss_mib, self.rss_mib())
            await asyncio.sleep(0.25)

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())


async def wait_until(fn: Any, timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(HubError):
            value = await fn()
            if value:
                return value
        await asyncio.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


async def release(admin: HubClient, approver: HubClient, path: Path, version: str,
                  tmp: Path) -> None:
    await admin.register_model(path, "bench", version)
    data = write_validation_set(path, tmp / f"val-{version}.npz", rows=200)
    await admin.validate_model("bench", version, data)
    await approver.call("model.approve", {"name": "bench", "version": version})
    await admin.call("model.release", {"name": "bench", "version": version})


async def raw_fetch(url: str, digest: str, size: int, readers: int, rounds: int = 5) -> float:
    nc = await nats.connect(url)

    async def one() -> int:
        n = 0
        async for chunk in iter_object_chunks(nc, "models", digest, size):
            n += len(chunk)
        return n

    # One round is 32 MiB, a fraction of a second: a single round moved 3x between runs
    # on the shared machine, so take the median of several.
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        total = sum(await asyncio.gather(*(one() for _ in range(readers))))
        rates.append(total / (time.perf_counter() - t) / 1e6)
    await nc.close()
    return statistics.median(rates)


def synthetic_windows(devices: list[str], count: int) -> list[tuple[str, bytes, str]]:
    out = []
    boot = "bench" + os.urandom(2).hex()
    now = time.time_ns()
    for i in range(count):
        device = devices[i % len(devices)]
        seq = i // len(devices) + 1
        w = proto.TelemetryWindow(
            device=device, boot=boot, seq=seq, model="bench", version="2", digest="00",
            start=now, end=now, count=10, errors=0, latency_ms_p50=0.1, latency_ms_p95=0.2,
            latency_ms_max=0.3, counter=0, latency_buckets=[0, 10] + [0] * 13,
        )
        out.append((proto.report_subject(device, "telemetry"), proto.encode_report(w),
                    proto.report_msg_id(device, boot, seq)))
    return out


async def publish_all(js: Any, msgs: list[tuple[str, bytes, str]], subject: str | None = None
                      ) -> None:
    for i in range(0, len(msgs), 500):
        await asyncio.gather(*(
            js.publish(subject or s, d, headers={"Nats-Msg-Id": m}) for s, d, m in msgs[i:i + 500]
        ))


async def raw_ingest(url: str, msgs: list[tuple[str, bytes, str]]) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCHRAW", subjects=["benchraw.>"],
                                     duplicate_window=600.0))
    await publish_all(js, [(f"benchraw.{i}", d, "raw" + m) for i, (_, d, m) in
                           enumerate(msgs)], subject=None)
    sub = await js.pull_subscribe("benchraw.>", durable="raw", stream="BENCHRAW")
    got = 0
    t = time.perf_counter()
    while got < len(msgs):
        batch = await sub.fetch(256, timeout=5)
        for msg in batch:
            proto.decode_report(msg.data)  # the same decode the hub does
            await msg.ack()
        got += len(batch)
    elapsed = time.perf_counter() - t
    await nc.close()
    return got / elapsed


async def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    server = EmbeddedNats(store_dir=tmp / "nats").start()
    config = init_home(tmp / "hub", server.url)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    hub_log = (tmp / "hub.log").open("wb")
    profile = ["-m", "cProfile", "-o", str(Path(args.profile) / "hub.prof")] \
        if args.profile else []
    if args.profile:  # the shards read it (testkit.fleet_sim)
        env["FLEET_SIM_PROFILE"] = os.environ["FLEET_SIM_PROFILE"] = args.profile
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    hub = subprocess.Popen([sys.executable, *profile, "-m", "hub.cli", "serve", "--home",
                            str(config.home), "--log-level", "ERROR"], env=env,
                           stdout=subprocess.DEVNULL, stderr=hub_log)
    watch = ProcWatch(hub.pid)
    watch.start()
    sim: ShardedFleet | None = None
    results: dict[str, Any] = {"devices": args.devices}
    try:
        admin_key = SigningKey.load(config.operator_key_path("admin"))
        admin = await HubClient.connect(server.url, admin_key, timeout=120)
        await wait_until(lambda: admin.call("status"), 30, "the hub")
        approver_key = SigningKey.generate()
        await admin.call("operator.add", {"name": "approver", "roles": ["approver"],
                                          "public": approver_key.public.raw})
        approver = await HubClient.connect(server.url, approver_key)
        extra = int(args.model_mib * 2**20)
        paths = {}
        for version in ("1", "2"):
            paths[version] = tmp / f"bench-v{version}.tflite"
            paths[version].write_bytes(model_for_version(int(version), extra_bytes=extra))
            await release(admin, approver, paths[version], version, tmp)
        size = paths["2"].stat().st_size
        results["model_bytes"] = size

        # The devices' state directories (slots, spools, fsyncs) on tmpfs by default:
        # a real fleet has a disk per device, 1,000 agents here would share one.
        sim_dir = Path(tempfile.mkdtemp(prefix="bench-fleet-sim-", dir=args.sim_dir))
        results["sim_dir"] = str(sim_dir)
        fleet = SimFleet(server.url, sim_dir, config.trust_root_path, args.devices,
                         prefix="b", rate=args.rate, window=args.window)
        t = time.perf_counter()
        await fleet.enroll(admin, group="bench")
        results["enroll_s"] = time.perf_counter() - t
        t = time.perf_counter()
        sim = ShardedFleet(fleet, args.procs)
        results["procs"] = sim.procs
        await sim.start()
        results["start_s"] = time.perf_counter() - t

        async def converge(version: str) -> tuple[float, int, float, float]:
            body = {"model": "bench", "version": version, "target": "group=bench",
                    "waves": "1%,10%,50%,100%", "min_success": 0.95, "max_failure": 0.05,
                    "deadline": f"{args.deadline:.0f}s"}
            rid = (await admin.call("rollout.create", body))["rollout"]
            assert sim is not None
            bytes_before = (await sim.stats())["bytes"]
            t0, wall0 = time.perf_counter(), time.time()
            await admin.call("rollout.start", {"rollout": rid})

            async def all_applied() -> bool:
                rows = await admin.call("rollouts")
                row = next(r for r in rows if r["rollout"] == rid)
                if row["state"] in ("halted", "aborted"):
                    raise SystemExit(f"rollout {rid} {row['state']}: {row['reason']}")
                return bool(row["state"] == "completed"
                            and row["counts"].get("applied", 0) == args.devices)

            await wait_until(all_applied, 600, f"rollout {rid}", every=0.2)
            elapsed = time.perf_counter() - t0
            status = await admin.call("rollout.status", {"rollout": rid})
            start_ns = next(e["ts"] for e in status["events"] if e["kind"] == "rollout.started")
            results.setdefault("waves_done", []).append([
                (e["ts"] - start_ns) / 1e9 for e in status["events"]
                if e["kind"] == "rollout.wave_completed"])
            stats = await sim.stats()
            rate, busy = transfer_rate(stats["transfers"], since=wall0)
            # One device's transfer, start to last byte: the tail that the last wave waits on.
            spans = sorted(e - s for s, e, _ in stats["transfers"] if s >= wall0 and e > s)
            if spans:
                results[f"transfer_{version}"] = (statistics.median(spans),
                                                  spans[int(0.95 * (len(spans) - 1))], spans[-1])
            return elapsed, stats["bytes"] - bytes_before, rate, busy

        cpu0 = watch.cpu()
        t = time.perf_counter()
        first, _, _, _ = await converge("1")
        results["converge_first_s"] = first
        elapsed, fetched, rate, busy = await converge("2")
        results["converge_s"] = elapsed
        results["fetch_over_converge_mb_s"] = fetched / elapsed / 1e6
        results["fetch_mb_s"] = rate / 1e6
        results["transfer_s"] = busy
        results["hub_cpu_rollouts"] = (watch.cpu() - cpu0) / (time.perf_counter() - t)
        results["raw_fetch_mb_s"] = await raw_fetch(server.url, blake3.blake3(
            paths["2"].read_bytes()).hexdigest(), size, 32)

        await sim.quiesce()
        msgs = synthetic_windows(fleet.ids, args.windows)
        before = (await admin.call("telemetry", {"device": fleet.ids[0]}))["windows"]
        nc = await nats.connect(server.url)
        # Both sides drain a stream filled beforehand: the hub is stopped (SIGSTOP) while
        # the windows are published, as the raw subscriber's stream is filled before it
        # starts, so neither figure includes the publishing.
        os.kill(hub.pid, signal.SIGSTOP)
        try:
            t = time.perf_counter()
            await publish_all(nc.jetstream(), msgs)
            results["publish_s"] = time.perf_counter() - t
        finally:
            os.kill(hub.pid, signal.SIGCONT)
        cpu0 = watch.cpu()
        t = time.perf_counter()
        await wait_until(lambda: _counted(admin, before + len(msgs)), 600, "telemetry ingest",
                         every=0.1)
        elapsed = time.perf_counter() - t
        results["ingest_msgs_s"] = len(msgs) / elapsed
        results["hub_cpu_ingest"] = (watch.cpu() - cpu0) / elapsed
        await nc.close()
        results["raw_ingest_msgs_s"] = await raw_ingest(server.url, msgs)
        results["hub_peak_rss_mib"] = watch.peak_rss_mib
        await admin.close()
        await approver.close()
    finally:
        if sim is not None:
            await sim.stop()
        if "sim_dir" in results:
            shutil.rmtree(results["sim_dir"], ignore_errors=True)
        hub.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            hub.wait(10)
        server.close()
        hub_log.close()
    report(results)


async def _counted(admin: HubClient, want: int) -> bool:
    # One device's rows: the whole fleet's are over the hub's reply limit at 1,000 devices.
    return bool((await admin.call("telemetry", {"device": "-"}))["windows"] >= want)


def _secs(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values) + " s"


def report(r: dict[str, Any]) -> None:
    print(f"devices: {r['devices']} in {r['procs']} processes (state in {r['sim_dir']}), "
          f"model {r['model_bytes'] / 2**20:.2f} MiB, "
          f"enroll {r['enroll_s']:.1f} s, agents started and watching in {r['start_s']:.1f} s")
    print("| measure | value | baseline (same run) | ratio |")
    print("|---|---|---|---|")
    print(f"| converge, first install (4 waves, no bake) | {r['converge_first_s']:.1f} s | "
          "target <= 15 s | |")
    print(f"| waves done at | {_secs(r['waves_done'][0])} | | |")
    print(f"| converge, update v1 -> v2 (4 waves, no bake) | {r['converge_s']:.1f} s | "
          "target <= 15 s | |")
    print(f"| waves done at | {_secs(r['waves_done'][1])} | | |")
    print(f"| aggregate model fetch during the update, over the transfer time "
          f"({r['transfer_s']:.1f} s) | {r['fetch_mb_s']:.1f} MB/s | raw pull read x32 "
          f"(median of 5): {r['raw_fetch_mb_s']:.1f} MB/s | "
          f"{r['fetch_mb_s'] / r['raw_fetch_mb_s']:.2f}x |")
    if "transfer_2" in r:
        p50, p95, top = r["transfer_2"]
        print(f"| one device's transfer during the update, p50 / p95 / max | {p50:.2f} / "
              f"{p95:.2f} / {top:.2f} s | | |")
    print(f"| bytes fetched / update converge time | {r['fetch_over_converge_mb_s']:.1f} MB/s "
          f"| | {r['fetch_over_converge_mb_s'] / r['raw_fetch_mb_s']:.2f}x |")
    print(f"| telemetry ingest | {r['ingest_msgs_s']:,.0f} msg/s | raw pull subscriber: "
          f"{r['raw_ingest_msgs_s']:,.0f} msg/s | "
          f"{r['ingest_msgs_s'] / r['raw_ingest_msgs_s']:.2f}x |")
    print(f"| publishing those windows while the hub was stopped (not in the ingest time) "
          f"| {r['publish_s']:.1f} s | | |")
    print(f"| hub CPU during rollouts | {r['hub_cpu_rollouts'] * 100:.0f}% of a core | | |")
    print(f"| hub CPU during ingest | {r['hub_cpu_ingest'] * 100:.0f}% of a core | | |")
    print(f"| hub peak RSS | {r['hub_peak_rss_mib']:.0f} MiB | | |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--model-mib", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=0.5, help="inferences/s per device")
    p.add_argument("--window", type=float, default=5.0, help="telemetry window (s)")
    p.add_argument("--windows", type=int, default=20000, help="synthetic windows to ingest")
    p.add_argument("--sim-dir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
                   help="where the simulated devices keep their state (default: tmpfs)")
    p.add_argument("--deadline", type=float, default=120.0,
                   help="rollout deadline (s): a device not applied by then fails its wave")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                   help="OS processes the simulated devices are sharded over")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run the hub and the shards under cProfile; stats into DIR "
                        "(slows them down: for finding where time goes, not for figures)")
    asyncio.run(run(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
