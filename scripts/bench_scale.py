#!/usr/bin/env python3
"""Scale benchmark: rollouts to 10,000 light simulated devices, and the hub at rest.

    PYTHONPATH=. .venv/bin/python scripts/bench_scale.py [--devices 10000] [--procs 6]
        [--waves 1%,10%,50%,100%] [--model-mib 1] [--rollouts 2] [--idle-seconds 30]

- a real nats-server with the configuration `hub init` writes (accounts, one nkey user
  per device with its own permissions) and a real `hub serve` (SQLite) in its own
  process, so its CPU and RSS are its own (/proc);
- the devices are testkit.scale_sim.LightDevice: per device its own NATS connection
  and nkey, hint + direct-get watches of its assignment and `root.latest`, the signed
  assignment, timestamp and manifest checked, the blob's metadata read by direct get,
  a signed status report per update with a JetStream publish; sharded over --procs OS
  processes. Shortcuts (testkit/scale_sim.py's docstring): no TFLite, no disk, no
  telemetry; with --shared-blob (default) one verified download of each blob per shard
  process instead of one per device (--no-shared-blob: every device reads every chunk);
- idle: hub and nats-server CPU% and RSS over --idle-seconds with every device
  connected and quiet (before the rollouts and again after them);
- converge: `rollout create --waves ...` (no bake, no gates) to all devices, from
  `rollout start` to every device applied, per wave from the ledger's
  `rollout.wave_completed` times; --rollouts of them (v1 first install, then updates);
- raw baseline, same run, same server: what the messaging of one rollout costs nats-py
  alone, as the hub's user: N assignment-sized KV puts (64 in flight), N direct gets
  of those keys, N report-sized JetStream publishes with acks (256 in flight);
- correctness: every device applied every rollout's version (its own reports, from the
  shards) and `ledger verify --log-key` passes.

Telemetry ingest with two hub processes sharing intake is `scripts/bench_intake.py`.

Timings are printed, never asserted; put `uptime` next to every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nats.js.api import KeyValueConfig, StreamConfig  # noqa: E402

from hub.client import HubClient  # noqa: E402
from hub.errors import HubError  # noqa: E402
from hub.home.config import init_home, load_config, set_nats_url  # noqa: E402
from hub.home.nats_config import jetstream_dir, server_conf_path  # noqa: E402
from ledger.signing import SigningKey  # noqa: E402
from testkit.modelgen import model_for_version, write_validation_set  # noqa: E402
from testkit.nats_server import EmbeddedNats  # noqa: E402
from testkit.scale_sim import ScaleShards, device_ids, device_key  # noqa: E402


class Proc:
    """CPU seconds and RSS of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


async def sample_idle(procs: dict[str, Proc], seconds: float) -> dict[str, Any]:
    """CPU% of a core and RSS of each process over `seconds`, plus the load average."""
    cpu0 = {k: p.cpu() for k, p in procs.items()}
    load0, t = load(), time.perf_counter()
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - t
    return {"load": f"{load0} -> {load()}", "seconds": wall,
            **{f"{k}_cpu": (p.cpu() - cpu0[k]) / wall for k, p in procs.items()},
            **{f"{k}_rss": p.rss_mib() for k, p in procs.items()}}


async def retry(fn: Any, timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(HubError):
            value = await fn()
            if value:
                return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)


async def release(admin: HubClient, approver: HubClient, path: Path, version: str,
                  tmp: Path) -> None:
    await admin.register_model(path, "scale", version)
    data = write_validation_set(path, tmp / f"val-{version}.npz", rows=100)
    await admin.validate_model("scale", version, data)
    await approver.call("model.approve", {"name": "scale", "version": version})
    await admin.call("model.release", {"name": "scale", "version": version})


async def enroll(admin: HubClient, ids: list[str], salt: str, concurrency: int) -> None:
    """Enroll every device with its derived key; concurrent enrolments share one NATS
    users-file rewrite and reload (hub.home.nats_users.NatsUsersSync)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(device: str) -> None:
        async with sem:
            await admin.call("device.enroll", {
                "device": device, "public": device_key(salt, device).public.raw})

    await asyncio.gather(*(one(d) for d in ids))


async def raw_baseline(url: str, auth: Any, n: int, assignment_bytes: int,
                       report_bytes: int) -> dict[str, float]:
    """Seconds nats-py alone takes for one rollout's messages, as the hub's user."""
    from edge_agent.transport.connect import connect

    nc = await connect(url, auth)
    js = nc.jetstream()
    bucket = "benchraw" + secrets.token_hex(2)
    kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=1,
                                                  direct=True))
    stream = "BENCHRAW" + secrets.token_hex(2).upper()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"],
                                     duplicate_window=120.0))
    value, report = os.urandom(assignment_bytes), os.urandom(report_bytes)
    out: dict[str, float] = {}

    async def in_flight(width: int, make: Any) -> float:
        t = time.perf_counter()
        for i in range(0, n, width):
            await asyncio.gather(*(make(k) for k in range(i, min(n, i + width))))
        return time.perf_counter() - t

    out["kv_put"] = await in_flight(64, lambda k: kv.put(f"d{k}", value))
    out["direct_get"] = await in_flight(64, lambda k: nc.request(
        f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.d{k}", b"", timeout=10))
    out["publish"] = await in_flight(256, lambda k: js.publish(
        f"{stream.lower()}.d{k}", report, headers={"Nats-Msg-Id": f"m{k}"}))
    with contextlib.suppress(Exception):
        await js.delete_key_value(bucket)
        await js.delete_stream(stream)
    await nc.close()
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ledger_bytes(home: Path) -> int:
    """The SQLite ledger and projections: the database file, its WAL and shm."""
    return sum(p.stat().st_size for p in home.glob("ledger.db*") if p.is_file())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    home = tmp / "hub"
    init_home(home, "nats://127.0.0.1:4222", nats_auth=True)
    server = EmbeddedNats(store_dir=tmp / "nats", config_file=server_conf_path(home)).start()
    set_nats_url(home, server.url)
    config = load_config(home)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    hub_log = (tmp / "hub.log").open("wb")
    profile = ["-m", "cProfile", "-o", str(Path(args.profile).resolve() / "hub.prof")] \
        if args.profile else []
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    hub = subprocess.Popen([sys.executable, *profile, "-m", "hub.cli", "serve", "--home", str(home),
                            "--log-level", "ERROR"], env=env, stdout=subprocess.DEVNULL,
                           stderr=hub_log)
    assert server.pid is not None
    procs = {"hub": Proc(hub.pid), "nats": Proc(server.pid)}
    r: dict[str, Any] = {"devices": args.devices, "waves": args.waves, "tmp": str(tmp)}
    shards: ScaleShards | None = None
    salt = secrets.token_hex(4)
    ids = device_ids("s", args.devices)
    try:
        admin_key = SigningKey.load(config.operator_key_path("admin"))
        admin = await HubClient.connect(server.url, admin_key, timeout=300,
                                        auth=config.operator_auth(admin_key))
        await retry(lambda: admin.call("status"), 30, "the hub")
        approver_key = SigningKey.generate()
        await admin.call("operator.add", {"name": "approver", "roles": ["approver"],
                                          "public": approver_key.public.raw})
        approver = await HubClient.connect(server.url, approver_key,
                                           auth=config.operator_auth(approver_key))
        versions = [str(v + 1) for v in range(args.rollouts)]
        for version in versions:
            path = tmp / f"scale-v{version}.tflite"
            path.write_bytes(model_for_version(int(version),
                                               extra_bytes=int(args.model_mib * 2**20)))
            await release(admin, approver, path, version, tmp)
        r["model_bytes"] = path.stat().st_size

        t = time.perf_counter()
        cpu0 = procs["hub"].cpu()
        await enroll(admin, ids, salt, args.enroll_concurrency)
        r["enroll_s"] = time.perf_counter() - t
        r["enroll_hub_cpu_s"] = procs["hub"].cpu() - cpu0
        r["enroll_load"] = load()

        t = time.perf_counter()
        cpu0 = procs["hub"].cpu()
        shards = ScaleShards(server.url, config.trust_root_path, args.devices, args.procs,
                             prefix="s", salt=salt, shared_blob=args.shared_blob)
        await shards.start()
        r["connect_s"] = time.perf_counter() - t
        r["procs"] = shards.procs
        # The `started` reports of every device are taken by the hub; wait until it is
        # quiet (nothing more in the ledger for a while), then measure.
        await asyncio.sleep(args.settle)
        r["connect_hub_cpu_s"] = procs["hub"].cpu() - cpu0  # the `started` reports
        r["idle_before"] = await sample_idle(procs, args.idle_seconds)

        jetstream = jetstream_dir(home)
        for version in versions:
            size0 = ledger_bytes(home)
            nats0 = dir_bytes(jetstream)
            cpu0 = {k: p.cpu() for k, p in procs.items()}
            sims = [Proc(pid) for pid in shards.pids]
            sim0 = sum(p.cpu() for p in sims)
            load0 = load()
            body = {"model": "scale", "version": version, "target": "all",
                    "waves": args.waves, "min_success": 1.0, "max_failure": 0.0,
                    "deadline": f"{args.deadline:.0f}s"}
            rid = (await admin.call("rollout.create", body))["rollout"]
            t0 = time.perf_counter()
            await admin.call("rollout.start", {"rollout": rid})

            async def completed(rid: str = rid) -> bool:
                rows = await admin.call("rollouts")
                row = next(x for x in rows if x["rollout"] == rid)
                if row["state"] in ("halted", "aborted"):
                    raise SystemExit(f"rollout {rid} {row['state']}: {row['reason']}")
                return bool(row["state"] == "completed")

            await retry(completed, args.deadline * 4, f"rollout {rid}", every=0.25)
            elapsed = time.perf_counter() - t0
            status = await admin.call("rollout.status", {"rollout": rid})
            start_ns = next(e["ts"] for e in status["events"] if e["kind"] == "rollout.started")
            r.setdefault("rollouts", []).append({
                "version": version, "converge_s": elapsed, "load": f"{load0} -> {load()}",
                "waves_done": [(e["ts"] - start_ns) / 1e9 for e in status["events"]
                               if e["kind"] == "rollout.wave_completed"],
                **{f"{k}_cpu_s": p.cpu() - cpu0[k] for k, p in procs.items()},
                "sim_cpu_s": sum(p.cpu() for p in sims) - sim0,
                "ledger_bytes": ledger_bytes(home) - size0,
                "nats_store_bytes": dir_bytes(jetstream) - nats0,
            })
        await asyncio.sleep(args.settle)
        r["idle_after"] = await sample_idle(procs, args.idle_seconds)

        applied = await shards.applied()
        stats = await shards.stats()
        r["sim_stats"] = stats
        wrong = [d for d in ids if [v for _, v, _ in applied.get(d, [])] != versions]
        r["wrong_devices"] = len(wrong)
        r["wrong_sample"] = wrong[:5]
        r["peak_rss"] = {k: p.rss_mib() for k, p in procs.items()}
        r["shard_rss_mib"] = [Proc(pid).rss_mib() for pid in shards.pids]

        r["raw"] = await raw_baseline(server.url, config.nats_auth("hub"), args.devices,
                                      args.assignment_bytes, args.report_bytes)
        r["raw_load"] = load()
        await admin.close()
        await approver.close()
    finally:
        if shards is not None:
            await shards.stop()
        hub.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            hub.wait(30)
        server.close()
        hub_log.close()
    verify = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "verify", "--home", str(home), "--log-key",
         str(home / "log.vkey"), "--json"], env=env, capture_output=True, text=True,
        timeout=600)
    r["verify_ok"] = verify.returncode == 0
    r["verify"] = (verify.stdout or verify.stderr).strip()[-300:]
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return r


def report(r: dict[str, Any]) -> None:
    n = r["devices"]
    print(f"devices: {n} in {r['procs']} processes, model {r['model_bytes'] / 2**20:.2f} MiB,"
          f" waves {r['waves']}; enroll {r['enroll_s']:.1f} s (hub CPU "
          f"{r['enroll_hub_cpu_s']:.1f} s, load {r['enroll_load']}), all connected and "
          f"watching {r['connect_s']:.1f} s (hub CPU for their `started` reports "
          f"{r['connect_hub_cpu_s']:.1f} s)")
    print("| measure | value | load (1 min) |")
    print("|---|---|---|")
    for i, ro in enumerate(r["rollouts"]):
        what = "first install" if i == 0 else "update"
        print(f"| converge, {what} v{ro['version']} (target <= 60 s) | "
              f"{ro['converge_s']:.1f} s | {ro['load']} |")
        print(f"| waves done at | {', '.join(f'{w:.1f}' for w in ro['waves_done'])} s | |")
        print(f"| hub CPU during it | {ro['hub_cpu_s']:.1f} s = "
              f"{ro['hub_cpu_s'] * 1e3 / n:.2f} ms/device | |")
        print(f"| nats-server CPU during it | {ro['nats_cpu_s']:.1f} s = "
              f"{ro['nats_cpu_s'] * 1e3 / n:.2f} ms/device | |")
        print(f"| simulator processes' CPU during it | {ro['sim_cpu_s']:.1f} s = "
              f"{ro['sim_cpu_s'] * 1e3 / n:.2f} ms/device | |")
        total = ro["hub_cpu_s"] + ro["nats_cpu_s"] + ro["sim_cpu_s"]
        cores = os.cpu_count() or 1
        print(f"| all three / {cores} cores: the converge time this box allows alone | "
              f"{total / cores:.1f} s | |")
        print(f"| SQLite growth (file + WAL) / JetStream store growth | "
              f"{ro['ledger_bytes'] / n:,.0f} / {ro['nats_store_bytes'] / n:,.0f} B/device"
              " | |")
    for when in ("idle_before", "idle_after"):
        s = r[when]
        label = "before the rollouts" if when == "idle_before" else "after the rollouts"
        print(f"| hub CPU, {n} connected and quiet, {label}, {s['seconds']:.0f} s "
              f"(target < 5%) | {s['hub_cpu'] * 100:.2f}% | {s['load']} |")
        print(f"| nats-server CPU, same window | {s['nats_cpu'] * 100:.2f}% | |")
        print(f"| hub RSS / nats-server RSS | {s['hub_rss']:.0f} / {s['nats_rss']:.0f} MiB | |")
    raw = r["raw"]
    total = raw["kv_put"] + raw["direct_get"] + raw["publish"]
    print(f"| raw nats-py, {n} KV puts / direct gets / publishes+ack | "
          f"{raw['kv_put']:.2f} / {raw['direct_get']:.2f} / {raw['publish']:.2f} s "
          f"(sum {total:.2f} s) | {r['raw_load']} |")
    best = min(ro["converge_s"] for ro in r["rollouts"])
    print(f"| best converge / raw sum | {best / total:.1f}x | |")
    print(f"| shard RSS (MiB) | {', '.join(f'{x:.0f}' for x in r['shard_rss_mib'])} | |")
    print(f"| devices whose applied versions are wrong | {r['wrong_devices']} "
          f"{r['wrong_sample']} | |")
    print(f"| sim: bytes read / refusals / watch fetches | {r['sim_stats']} | |")
    print(f"| ledger verify --log-key | {'OK' if r['verify_ok'] else 'FAILED'} | |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--procs", type=int, default=6, help="simulator OS processes")
    p.add_argument("--waves", default="1%,10%,50%,100%")
    p.add_argument("--model-mib", type=float, default=1.0)
    p.add_argument("--rollouts", type=int, default=2, help="v1 first install, then updates")
    p.add_argument("--deadline", type=float, default=300.0)
    p.add_argument("--idle-seconds", type=float, default=30.0)
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds to wait before an idle sample")
    p.add_argument("--enroll-concurrency", type=int, default=256)
    p.add_argument("--shared-blob", action=argparse.BooleanOptionalAction, default=True,
                   help="one blob download per shard process (default) or per device")
    p.add_argument("--assignment-bytes", type=int, default=600)
    p.add_argument("--report-bytes", type=int, default=400)
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run the hub under cProfile, stats into DIR/hub.prof (slows it: "
                        "for finding where time goes, not for figures)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args()
    r = asyncio.run(run(args))
    report(r)
    if args.json:
        print(json.dumps(r, default=str))
    ok = r["verify_ok"] and r["wrong_devices"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
