#!/usr/bin/env python3
"""Soak: many simulated devices send telemetry to a real hub for a bounded time, with
NATS authentication on and then, for comparison, off. Loopback only; figures printed,
never asserted (except sent == counted, the point of the run).

    .venv/bin/python scripts/soak.py [--devices 1000] [--duration 60] [--rate 1]

What is simulated, honestly: every device is its own NATS connection in this one
process (1,000 nats-py clients on one event loop), authenticated with its own nkey (its
enrolled Ed25519 device key) and confined by its own permissions, as a real device is.
It does not run the model: each device publishes synthetic telemetry windows (the real
wire format, signed reports are not involved) to `fleet.report.<id>.telemetry` with
JetStream, `--rate` windows per second each, waiting for each publish acknowledgement
(the agent keeps a window in its spool until then). The hub is `hub serve` in its own
process, so its RSS is its own; `sent` counts acknowledged publishes, `counted` is the
hub's telemetry window count once it has caught up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nats.aio.client import Client as NATS  # noqa: E402

from edge_agent import protocol as proto  # noqa: E402
from edge_agent.transport.connect import NO_AUTH, NatsAuth  # noqa: E402
from edge_agent.transport.connect import connect as nats_connect  # noqa: E402
from hub.client import HubClient  # noqa: E402
from hub.errors import HubError  # noqa: E402
from hub.home.config import init_home, load_config, set_nats_url  # noqa: E402
from hub.home.nats_config import server_conf_path  # noqa: E402
from ledger.signing import SigningKey  # noqa: E402
from testkit.nats_server import EmbeddedNats  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _quiet(exc: Exception) -> None:
    pass


def window(device: str, boot: str, seq: int) -> bytes:
    now = time.time_ns()
    return proto.encode_report(proto.TelemetryWindow(
        device=device, boot=boot, seq=seq, model="soak", version="1", digest="00",
        start=now, end=now, count=10, errors=0, latency_ms_p50=0.1, latency_ms_p95=0.2,
        latency_ms_max=0.3, counter=0, latency_buckets=[0, 10] + [0] * 13,
    ))


@dataclass
class Result:
    auth: bool
    devices: int
    enroll_s: float = 0.0
    connect_s: float = 0.0
    sent: int = 0
    counted: int = 0
    duplicates: int = 0
    catch_up_s: float = 0.0
    rss_start: float = 0.0
    rss_end: float = 0.0
    hub_cpu: float = 0.0
    publish_errors: int = 0


async def wait_until(fn: Any, timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(HubError):
            value = await fn()
            if value:
                return value
        await asyncio.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


async def soak(args: argparse.Namespace, auth: bool) -> Result:
    result = Result(auth, args.devices)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    home = tmp / "hub"
    init_home(home, "nats://127.0.0.1:4222", nats_auth=auth)
    server = EmbeddedNats(store_dir=tmp / "nats",
                          config_file=server_conf_path(home) if auth else None).start()
    set_nats_url(home, server.url)
    config = load_config(home)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    hub_log = (tmp / "hub.log").open("wb")
    hub = subprocess.Popen([sys.executable, "-m", "hub.cli", "serve", "--home", str(home),
                            "--log-level", "ERROR"], env=env, stdout=subprocess.DEVNULL,
                           stderr=hub_log)
    conns: list[NATS] = []
    try:
        admin_key = SigningKey.load(config.operator_key_path("admin"))
        admin = await HubClient.connect(server.url, admin_key, timeout=120,
                                        auth=config.operator_auth(admin_key))
        await wait_until(lambda: admin.call("status"), 30, "the hub")
        ids = [f"soak-{i:04d}" for i in range(args.devices)]
        keys = {d: SigningKey.generate() for d in ids}
        sem = asyncio.Semaphore(32)

        async def enroll(device: str) -> None:
            async with sem:
                await admin.call("device.enroll",
                                 {"device": device, "public": keys[device].public.raw})

        t = time.perf_counter()
        await asyncio.gather(*(enroll(d) for d in ids))
        result.enroll_s = time.perf_counter() - t
        result.rss_start = rss_mib(hub.pid)

        csem = asyncio.Semaphore(64)

        async def connect(device: str) -> NATS:
            creds = (NatsAuth.for_device(device, keys[device].private_raw()) if auth
                     else NO_AUTH)
            async with csem:
                return await nats_connect(server.url, creds, name=device, error_cb=_quiet,
                                          max_reconnect_attempts=-1, pending_size=1 << 20)

        t = time.perf_counter()
        conns = list(await asyncio.gather(*(connect(d) for d in ids)))
        result.connect_s = time.perf_counter() - t

        boot = "soak" + os.urandom(3).hex()
        interval = 1.0 / args.rate
        start = time.monotonic()
        deadline = start + args.duration
        cpu0 = cpu_s(hub.pid)

        async def device(i: int, nc: NATS) -> None:
            js = nc.jetstream(timeout=30)
            dev = ids[i]
            subject = proto.report_subject(dev, "telemetry")
            # Spread the devices over the first interval, as independent devices are.
            next_at = start + interval * i / len(ids)
            seq = 0
            while True:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() >= deadline:
                    return
                seq += 1
                try:
                    await js.publish(subject, window(dev, boot, seq), headers={
                        "Nats-Msg-Id": proto.report_msg_id(dev, boot, seq)})
                    result.sent += 1
                except Exception:
                    result.publish_errors += 1  # not acknowledged: not counted as sent
                next_at = max(next_at + interval, time.monotonic() - interval)

        await asyncio.gather(*(device(i, nc) for i, nc in enumerate(conns)))
        t = time.perf_counter()

        async def caught_up() -> bool:
            tel = await admin.call("telemetry")
            result.counted, result.duplicates = tel["windows"], tel["duplicates"]
            return bool(result.counted >= result.sent)

        await wait_until(caught_up, args.catch_up, "the hub to count every window", 0.2)
        result.catch_up_s = time.perf_counter() - t
        result.hub_cpu = (cpu_s(hub.pid) - cpu0) / (time.monotonic() - start)
        result.rss_end = rss_mib(hub.pid)
        await admin.close()
    finally:
        for nc in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2)
        hub.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            hub.wait(15)
        server.close()
        hub_log.close()
    return result


def report(args: argparse.Namespace, results: list[Result]) -> None:
    print(f"soak: {args.devices} devices x {args.rate:g} windows/s for {args.duration:g} s, "
          "one process, one NATS connection per device")
    print("| run | enroll | connect all | sent (acked) | counted by hub | duplicates | "
          "hub caught up after | hub RSS start -> end | hub CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| auth {'on (nkeys, permissions)' if r.auth else 'off'} | {r.enroll_s:.1f} s | "
              f"{r.connect_s:.1f} s | {r.sent:,} | {r.counted:,} | {r.duplicates} | "
              f"{r.catch_up_s:.1f} s | {r.rss_start:.0f} -> {r.rss_end:.0f} MiB | "
              f"{r.hub_cpu:.0%} |")
    if len(results) == 2:
        on, off = results
        print(f"auth overhead: connect {on.connect_s / max(off.connect_s, 1e-9):.2f}x, "
              f"windows sent {on.sent / max(off.sent, 1):.3f}x")
    for r in results:
        if r.sent != r.counted or r.publish_errors:
            print(f"MISMATCH (auth {'on' if r.auth else 'off'}): sent {r.sent}, counted "
                  f"{r.counted}, unacknowledged publishes {r.publish_errors}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sending")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="telemetry windows per second per device")
    parser.add_argument("--catch-up", type=float, default=300.0,
                        help="longest wait (s) for the hub to count everything")
    parser.add_argument("--no-baseline", action="store_true", help="skip the auth-off run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    results = [await soak(args, auth=True)]
    if not args.no_baseline:
        results.append(await soak(args, auth=False))
    report(args, results)
    return 0 if all(r.sent == r.counted and not r.publish_errors for r in results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
