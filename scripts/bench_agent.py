"""Edge agent footprint and update latency, against the raw Object Store read.

One run: a private nats-server, a hub in this process, one real agent process
(`edge-agent run --bundle ... --synthetic-load --rate 0`: no inferences). It measures

1. resident memory (VmRSS) and CPU of the idle agent with a model loaded, sampled from
   /proc/PID/status and /proc/PID/stat over --idle-seconds (targets: <= 60 MB, < 1%);
2. the time from `hub deploy` (the signed assignment written to KV) to the device's
   `device.update_applied` entry in the ledger, for a 1 MB and a 50 MB model, next to
   the time the bare Object Store read of the same blob takes in the same run
   (edge_agent.fetch.iter_object_chunks on its own, with BLAKE3);
3. where the memory goes: RSS of a fresh Python after importing numpy, the TFLite
   runtime, nats-py and the agent module, one at a time.

    .venv/bin/python scripts/bench_agent.py [--repeat 3] [--idle-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import blake3  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edge_agent.protocol.names import RELEASES_BUCKET  # noqa: E402
from edge_agent.transport.objects import iter_object_chunks  # noqa: E402
from hub import events as ev  # noqa: E402
from testkit.modelgen import model_for_version  # noqa: E402
from testkit.nats_server import EmbeddedNats  # noqa: E402
from tests.fleet import Fleet  # noqa: E402

DEVICE = "bench-0"
SIZES = {"1": 1_000_000, "2": 50_000_000}  # version -> extra bytes (1 MB, 50 MB)
CLK_TCK = os.sysconf("SC_CLK_TCK")
console = Console()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_ticks(pid: int) -> int:
    # Fields after the command name (which may contain spaces): utime is 14th, stime 15th.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def sample_idle(pid: int, seconds: float) -> dict[str, float]:
    start_ticks, start = cpu_ticks(pid), time.monotonic()
    samples = []
    while time.monotonic() - start < seconds:
        samples.append(rss_kib(pid))
        await asyncio.sleep(0.25)
    elapsed = time.monotonic() - start
    cpu = (cpu_ticks(pid) - start_ticks) / CLK_TCK / elapsed * 100.0
    return {"rss_mb": statistics.median(samples) * 1024 / 1e6,
            "rss_max_mb": max(samples) * 1024 / 1e6, "cpu_pct": cpu}


async def raw_read(fleet: Fleet, digest: str, size: int) -> float:
    async with await fleet.client(role="hub") as client:  # operators have no bucket rights
        t = time.perf_counter()
        hasher = blake3.blake3()
        async for chunk in iter_object_chunks(client.nc, RELEASES_BUCKET, digest, size):
            hasher.update(chunk)
        elapsed = time.perf_counter() - t
    assert hasher.hexdigest() == digest
    return elapsed


async def deploy_and_time(fleet: Fleet, version: str) -> float:
    before = len(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE))
    async with await fleet.client() as client:
        t = time.perf_counter()
        await client.call("deploy", {"model": "kws", "version": version, "devices": [DEVICE]})
        await fleet.feed.wait_for(
            lambda _: any(e.payload["version"] == version for e in
                          fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)[before:]),
            timeout=300, what=f"{DEVICE} to apply kws/{version}")
        return time.perf_counter() - t


def import_costs() -> list[tuple[str, float]]:
    """RSS (MB) of a fresh interpreter after each import step, cumulative."""
    steps = [
        ("python", ""),
        ("+ numpy", "import numpy"),
        ("+ TFLite runtime", "import edge_agent.runtime"),
        ("+ nats-py", "import nats, nats.js"),
        ("+ edge_agent.agent", "import edge_agent.agent"),
    ]
    out, code = [], []
    for label, stmt in steps:
        if stmt:
            code.append(stmt)
        script = "; ".join([*code, "import re; print(re.search(r'VmRSS:\\s+(\\d+)', "
                                  "open('/proc/self/status').read()).group(1))"])
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
        value = float(result.stdout.strip() or "nan") * 1024 / 1e6
        out.append((label, value))
    return out


async def bench(url: str, work: Path, repeat: int, idle_seconds: float) -> None:
    fleet = await Fleet(work, url).start()
    try:
        models = {}
        for version, extra in SIZES.items():
            path = work / f"kws-{version}.tflite"
            path.write_bytes(model_for_version(int(version), extra_bytes=extra))
            models[version] = (path, blake3.blake3(path.read_bytes()).hexdigest(),
                               path.stat().st_size)
            await fleet.release_model(path, "kws", version)
        async with await fleet.client() as client:
            await client.call("device.enroll", {"device": DEVICE})
        agent = fleet.agent(DEVICE)
        agent.rate = 0.0
        agent.window = 5.0
        agent.start()
        assert agent.process is not None
        pid = agent.process.pid

        applied: dict[str, list[float]] = {v: [] for v in SIZES}
        raw: dict[str, list[float]] = {v: [] for v in SIZES}
        idle: dict[str, dict[str, float]] = {}
        for i in range(repeat):
            for version in SIZES:
                applied[version].append(await deploy_and_time(fleet, version))
                _, digest, size = models[version]
                raw[version].append(await raw_read(fleet, digest, size))
                if i == repeat - 1:
                    await asyncio.sleep(2.0)  # let the install's garbage settle
                    idle[version] = await sample_idle(pid, idle_seconds)

        table = Table("model", "size", "assignment -> applied s", "raw Object Store read s",
                      "ratio", title=f"update latency, median of {repeat}")
        for version, (_, _, size) in models.items():
            a, r = statistics.median(applied[version]), statistics.median(raw[version])
            table.add_row(f"kws/{version}", f"{size / 1e6:.1f} MB", f"{a:.2f}", f"{r:.3f}",
                          f"{a / r:.1f}x")
        console.print(table)

        table = Table("model loaded", "RSS median MB", "RSS max MB", "idle CPU %",
                      "target", title=f"idle agent (--rate 0), {idle_seconds:.0f} s")
        for version, s in idle.items():
            ok = s["rss_max_mb"] <= 60 and s["cpu_pct"] < 1
            table.add_row(f"kws/{version} ({models[version][2] / 1e6:.0f} MB)",
                          f"{s['rss_mb']:.1f}", f"{s['rss_max_mb']:.1f}", f"{s['cpu_pct']:.2f}",
                          "[green]met[/green]" if ok else "[red]missed[/red]")
        console.print(table)
    finally:
        await fleet.stop()

    table = Table("fresh interpreter", "RSS MB", "step MB", title="where the memory goes")
    previous = 0.0
    for label, value in import_costs():
        table.add_row(label, f"{value:.1f}", f"{value - previous:+.1f}" if previous else "")
        previous = value
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp, \
            EmbeddedNats(store_dir=Path(tmp) / "nats") as server:
        asyncio.run(bench(server.url, Path(tmp), args.repeat, args.idle_seconds))


if __name__ == "__main__":
    main()
