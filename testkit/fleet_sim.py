"""A fleet simulator: N real edge agents (edge_agent.agent.EdgeAgent) in one asyncio
loop, each with its own NATS connection, state directory, device key and real TFLite
inference on generated inputs. Faults are injected per device (edge_agent.faults.Faults:
install failures, inference error rates, output drift), so rollouts can be exercised
against a fleet whose misbehaviour is known.

Used by tests/test_rollouts.py, scripts/fleet_sim.py and scripts/bench_fleet.py.
`ShardedFleet` runs the agents in several OS processes (`python -m testkit.fleet_sim`, one
shard each), so a 1,000-device fleet gets the cores a real one has instead of one
Python thread.
In-process agents skip the child-process model preflight (`isolate_preflight=False`):
it protects a real device from a crashing runtime, and 1,000 child processes would
measure process start-up, not the control plane.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import blake3

from edge_agent.agent import AgentConfig, EdgeAgent
from edge_agent.faults import Faults
from hub.client import HubClient
from hub.errors import HubError
from ledger.signing import SigningKey

log = logging.getLogger("fleet_sim")


class SimAgent(EdgeAgent):
    """An EdgeAgent that counts the inferences it put into telemetry windows and records
    each model transfer as (start, last byte, bytes), wall clock, for benchmarks; both
    through AgentConfig's observer hooks."""

    def __init__(self, config: AgentConfig) -> None:
        self.produced = 0  # inferences in windows this agent emitted
        self.windows = 0
        self.transfers: list[tuple[float, float, int]] = []
        super().__init__(replace(config, on_window=self._count_window,
                                 on_transfer=self._note_transfer))

    def _count_window(self, inferences: int) -> None:
        self.produced += inferences
        self.windows += 1

    def _note_transfer(self, start: float, last_byte: float, received: int) -> None:
        self.transfers.append((start, last_byte, received))


@dataclass
class SimFleet:
    nats_url: str
    root: Path
    trust_root: Path
    devices: int
    prefix: str = "sim"
    rate: float = 2.0  # inferences per second per device
    window: float = 1.0  # telemetry window (s)
    health_window: float = 0.0  # the agent's own revert window; 0 = off
    spool_fsync: bool = False  # tests and benchmarks: no fsync per report
    js_domain: str | None = None  # behind an edge site's leaf node: the cluster's domain
    agents: dict[str, SimAgent] = field(default_factory=dict)
    _stops: dict[str, asyncio.Event] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [f"{self.prefix}-{i:04d}" for i in range(self.devices)]

    def key_path(self, device: str) -> Path:
        return self.root / device / "device.key"

    def _key(self, device: str) -> SigningKey:
        path = self.key_path(device)
        if path.exists():
            return SigningKey.load(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        key.save(path)
        path.chmod(0o600)
        return key

    async def enroll(self, client: HubClient, group: str | None = None,
                     tags: dict[str, str] | None = None, concurrency: int = 32) -> None:
        """Enroll every device (with its own key) and tag it; already enrolled is fine."""
        sem = asyncio.Semaphore(concurrency)

        async def one(device: str) -> None:
            async with sem:
                try:
                    await client.call("device.enroll", {
                        "device": device, "public": self._key(device).public.raw})
                except HubError as exc:
                    if "already enrolled" not in str(exc):
                        raise
                if group is not None or tags:
                    body: dict[str, Any] = {"device": device, "tags": tags or {}}
                    if group is not None:
                        body["group"] = group
                    await client.call("device.tag", body)

        await asyncio.gather(*(one(d) for d in self.ids))

    def config_for(self, device: str) -> AgentConfig:
        return AgentConfig(
            device_id=device, nats_url=self.nats_url, state_dir=self.root / device,
            trust_root=self.trust_root, inference_hz=self.rate, synthetic_load=True,
            serve_api=False, window_seconds=self.window,
            health_window=self.health_window, faults="", device_key=self.key_path(device),
            spool_fsync=self.spool_fsync, isolate_preflight=False, js_domain=self.js_domain,
        )

    async def start(self, devices: Iterable[str] | None = None) -> None:
        for device in devices if devices is not None else self.ids:
            self._key(device)
            agent = SimAgent(self.config_for(device))
            stop = asyncio.Event()
            self.agents[device] = agent
            self._stops[device] = stop
            self._tasks[device] = asyncio.create_task(agent.run(stop), name=f"sim-{device}")

    async def restart(self, devices: Iterable[str]) -> None:
        """Stop these agents (as SIGTERM would) and start them again from their state
        directories, as a device that reboots does. Their counts carry over."""
        devices = list(devices)
        for device in devices:
            self._stops[device].set()
        tasks = [self._tasks[d] for d in devices]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, timeout=15)
        for device in devices:
            old = self.agents[device]
            if not self._tasks[device].done():
                self._tasks[device].cancel()
            agent = SimAgent(self.config_for(device))
            agent.produced, agent.windows = old.produced, old.windows
            agent.transfers = old.transfers
            stop = asyncio.Event()
            self.agents[device] = agent
            self._stops[device] = stop
            self._tasks[device] = asyncio.create_task(agent.run(stop), name=f"sim-{device}")

    def dead(self) -> list[str]:
        """Agents whose run() ended although nobody asked them to stop."""
        return [d for d, t in self._tasks.items() if t.done() and not self._stops[d].is_set()]

    async def wait_watching(self, timeout: float = 120.0) -> None:
        """Until every started agent is connected and watches its assignment: a
        benchmark's clock should not include the fleet's own start-up."""
        async def all_watching() -> None:
            while not all(a.watching for a in self.agents.values()):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_watching(), timeout)

    def inject(self, devices: Iterable[str], **faults: Any) -> None:
        """Set faults on running agents, e.g. inject(ids, install_error=True, version="2")."""
        for device in devices:
            agent = self.agents[device]
            agent.faults = replace(Faults(), **faults)

    def pick(self, share: float, salt: str = "") -> list[str]:
        """A deterministic share of the devices (by BLAKE3 of salt + id)."""
        ordered = sorted(self.ids, key=lambda d: blake3.blake3((salt + d).encode()).digest())
        return sorted(ordered[: round(share * len(ordered))])

    def produced(self) -> int:
        return sum(a.produced for a in self.agents.values())

    def spooled(self) -> int:
        return sum(len(a.spool) for a in self.agents.values())

    async def quiesce(self, timeout: float = 30.0) -> None:
        """Stop inferring, emit the last windows, and wait until every spool is empty."""
        for agent in self.agents.values():
            agent.inference_paused = True
        for agent in self.agents.values():
            agent.emit_window()

        async def drained() -> None:
            while self.spooled():
                await asyncio.sleep(0.05)

        await asyncio.wait_for(drained(), timeout)

    async def stop(self) -> None:
        for stop in self._stops.values():
            stop.set()
        tasks = list(self._tasks.values())
        if tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait(tasks, timeout=15)
        for task in tasks:
            if not task.done():
                task.cancel()
        self._tasks.clear()
        self._stops.clear()

    def transfers(self) -> list[tuple[float, float, int]]:
        return [t for a in self.agents.values() for t in a.transfers]

    def bytes_received(self) -> int:
        return sum(a.download_stats.bytes_received for a in self.agents.values())


def transfer_rate(transfers: list[tuple[float, float, int]], since: float = 0.0
                  ) -> tuple[float, float]:
    """(bytes/s, seconds): the bytes of the transfers that started after `since`, over
    the time at least one of them was in progress (the union of their intervals), so
    wave pacing and idle controller ticks between transfers are not counted."""
    spans = sorted((s, e) for s, e, _ in transfers if s >= since and e > s)
    total = sum(n for s, e, n in transfers if s >= since and e > s)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return (total / busy if busy > 0 else 0.0), busy


class ShardedFleet:
    """The agents of a SimFleet spread over `procs` OS processes (`python -m
    testkit.fleet_sim`), driven over their stdin/stdout with one JSON line per command.
    Enroll with SimFleet.enroll first (it writes the device keys the shards load)."""

    def __init__(self, fleet: SimFleet, procs: int) -> None:
        self.fleet = fleet
        self.procs = max(1, min(procs, fleet.devices))
        self._shards: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        ids = self.fleet.ids
        for k in range(self.procs):
            devices = ids[k::self.procs]
            f = self.fleet
            args = [sys.executable, "-m", "testkit.fleet_sim", "--nats", f.nats_url,
                    "--root", str(f.root), "--trust-root", str(f.trust_root),
                    "--total", str(f.devices), "--prefix", f.prefix, "--rate", str(f.rate),
                    "--window", str(f.window), "--shard", str(k), "--shards", str(self.procs)]
            for device in devices:
                f._key(device)
            root = str(Path(__file__).resolve().parent.parent)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=env, limit=2**26)
            self._shards.append(proc)
        for proc in self._shards:
            await self._reply(proc)  # {"ready": n}

    @staticmethod
    async def _reply(proc: asyncio.subprocess.Process) -> Any:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fleet shard {proc.pid} exited ({await proc.wait()})")
        return json.loads(line)

    async def _all(self, command: str) -> list[Any]:
        for proc in self._shards:
            assert proc.stdin is not None
            proc.stdin.write(command.encode() + b"\n")
            await proc.stdin.drain()
        return [await self._reply(proc) for proc in self._shards]

    async def stats(self) -> dict[str, Any]:
        """bytes received, transfers, spooled and produced, summed over the shards."""
        replies = await self._all("stats")
        return {"bytes": sum(r["bytes"] for r in replies),
                "transfers": [tuple(t) for r in replies for t in r["transfers"]],
                "spooled": sum(r["spooled"] for r in replies),
                "produced": sum(r["produced"] for r in replies)}

    async def quiesce(self) -> None:
        await self._all("quiesce")

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._all("stop"), 30)
        for proc in self._shards:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._shards.clear()


async def _serve_shard(a: argparse.Namespace) -> None:
    """One shard: run every `shards`-th device from `shard` on, answer commands. With
    FLEET_SIM_PROFILE=DIR it runs under cProfile and writes DIR/shard-K.prof on stop
    (benchmarks: where a shard's CPU goes)."""
    logging.basicConfig(level=logging.ERROR)
    profile_dir = os.environ.get("FLEET_SIM_PROFILE")
    profiler = None
    if profile_dir:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        await _run_shard(a)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(Path(str(profile_dir)) / f"shard-{a.shard}.prof"))


async def _run_shard(a: argparse.Namespace) -> None:
    fleet = SimFleet(a.nats, Path(a.root), Path(a.trust_root), a.total, prefix=a.prefix,
                     rate=a.rate, window=a.window)
    await fleet.start(fleet.ids[a.shard::a.shards])
    await fleet.wait_watching()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": len(fleet.agents)})
    while True:
        command = (await reader.readline()).decode().strip()
        if command == "stats":
            say({"bytes": fleet.bytes_received(), "transfers": fleet.transfers(),
                 "spooled": fleet.spooled(), "produced": fleet.produced()})
        elif command == "quiesce":
            await fleet.quiesce(timeout=120)
            say({"ok": True})
        else:  # "stop", or the parent went away
            await fleet.stop()
            say({"ok": True})
            return


def _main() -> None:
    p = argparse.ArgumentParser(description="one shard of a ShardedFleet")
    p.add_argument("--nats", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--trust-root", required=True)
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--prefix", default="sim")
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--window", type=float, default=1.0)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    asyncio.run(_serve_shard(p.parse_args()))


if __name__ == "__main__":
    _main()
