"""A fleet simulator: N real edge agents (edge_agent.agent.EdgeAgent) in one asyncio
loop, each with its own NATS connection, state directory, device key and real TFLite
inference on generated inputs. Faults are injected per device (edge_agent.agent.Faults:
install failures, inference error rates, output drift), so rollouts can be exercised
against a fleet whose misbehaviour is known.

Used by tests/test_rollouts.py, scripts/fleet_sim.py and scripts/bench_fleet.py.
In-process agents skip the child-process model preflight (`isolate_preflight=False`):
it protects a real device from a crashing runtime, and 1,000 child processes would
measure process start-up, not the control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import blake3

from edge_agent.agent import AgentConfig, EdgeAgent, Faults
from edge_agent.runtime import LoadedModel
from ledger.signing import SigningKey

from .client import HubClient, HubError

log = logging.getLogger("fleet_sim")


class SimAgent(EdgeAgent):
    """An EdgeAgent that counts the inferences it put into telemetry windows, and whose
    inference can be paused (to drain spools before comparing counts)."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__(config)
        self.produced = 0  # inferences in windows this agent emitted
        self.windows = 0
        self.quiet = False

    def _infer_once(self, model: LoadedModel) -> None:
        if not self.quiet:
            super()._infer_once(model)

    def _emit_window(self) -> None:
        count = self._window.count
        before = self._seq
        super()._emit_window()
        if self._seq != before:  # a window was emitted
            self.produced += count
            self.windows += 1


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
            trust_root=self.trust_root, inference_hz=self.rate, window_seconds=self.window,
            health_window=self.health_window, faults="", device_key=self.key_path(device),
            spool_fsync=self.spool_fsync, isolate_preflight=False,
        )

    async def start(self, devices: Iterable[str] | None = None) -> None:
        for device in devices if devices is not None else self.ids:
            self._key(device)
            agent = SimAgent(self.config_for(device))
            stop = asyncio.Event()
            self.agents[device] = agent
            self._stops[device] = stop
            self._tasks[device] = asyncio.create_task(agent.run(stop), name=f"sim-{device}")

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
            agent.quiet = True
        for agent in self.agents.values():
            agent._emit_window()

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
