"""Helpers for the secure-delivery tests: configurable agents, report watching, forged documents.

Everything here uses the real harness (tests/fleet.py); waits are on events with timeouts.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from edge_agent import protocol as proto
from edge_agent.protocol.names import ASSIGNMENTS_BUCKET, MANIFESTS_BUCKET
from edge_agent.transport.connect import connect as nats_connect
from hub import events as ev
from hub.client import HubClient
from ledger.entry import Entry
from ledger.signing import SigningKey
from tests.fleet import REPO_ROOT, AgentProcess, Fleet

HOUR_NS = 3600 * 10**9
Report = proto.StatusReport | proto.TelemetryWindow


@dataclass
class ConfiguredAgent(AgentProcess):
    """An agent process with extra command-line options and environment variables."""

    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> ConfiguredAgent:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(self.extra_args),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def configured_agent(
    fleet: Fleet, device: str, extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> ConfiguredAgent:
    """Register (not start) an agent for `device` in the fleet, so fleet.stop() stops it."""
    agent = ConfiguredAgent(
        device, fleet.nats_url, fleet.root / "devices" / device, fleet.config.trust_root_path,
        fleet.root / f"{device}.log", bundle=fleet.bundle(device),
        extra_args=extra_args or [], env=env or {},
    )
    fleet.agents[device] = agent
    return agent


class ReportWatch:
    """Every report a device publishes, from a core NATS subscription, decoded."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.reports: list[Report] = []
        self._changed = asyncio.Event()
        self._nc: NATS | None = None

    @classmethod
    async def start(cls, url: str, device: str) -> ReportWatch:
        watch = cls(device)
        watch._nc = await nats_connect(url, name=f"test-reports-{device}")
        await watch._nc.subscribe(f"fleet.report.{device}.*", cb=watch._on_msg)
        await watch._nc.flush()
        return watch

    async def _on_msg(self, msg: Msg) -> None:
        self.reports.append(proto.read_report(msg.data)[0])
        self._changed.set()

    def mark(self) -> int:
        return len(self.reports)

    async def wait_for(
        self, predicate: Callable[[Report], bool], after: int = 0, timeout: float = 30.0,
        what: str = "a report",
    ) -> Report:
        async def until() -> Report:
            seen = after
            while True:
                while seen < len(self.reports):
                    report = self.reports[seen]
                    seen += 1
                    if predicate(report):
                        return report
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            tail = [_short(r) for r in self.reports[after:][-8:]]
            raise AssertionError(f"timed out waiting for {what}; last reports: {tail}") from None

    async def status(self, event: str, after: int = 0, timeout: float = 30.0,
                     boot: str | None = None) -> proto.StatusReport:
        report = await self.wait_for(
            lambda r: isinstance(r, proto.StatusReport) and r.event == event
            and (boot is None or r.boot == boot),
            after, timeout, what=f"status {event!r}",
        )
        assert isinstance(report, proto.StatusReport)
        return report

    async def telemetry_of(self, digest: str, after: int = 0,
                           timeout: float = 30.0) -> proto.TelemetryWindow:
        report = await self.wait_for(
            lambda r: isinstance(r, proto.TelemetryWindow) and r.digest == digest
            and r.count > 0,
            after, timeout, what=f"a telemetry window of {digest[:12]}",
        )
        assert isinstance(report, proto.TelemetryWindow)
        return report

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


def _short(report: Report) -> str:
    if isinstance(report, proto.StatusReport):
        return f"status {report.event} {report.version} {report.reason[:80]}"
    return f"telemetry {report.version} {report.count}/{report.errors}"


# ---------------------------------------------------------------- fleet steps


def applied(fleet: Fleet, device: str, version: str) -> bool:
    return any(e.payload["version"] == version
               for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, device))


async def deploy(client: HubClient, version: str, devices: list[str]) -> None:
    await client.call("deploy", {"model": "kws", "version": version, "devices": devices})


async def deploy_and_wait(fleet: Fleet, client: HubClient, version: str,
                          devices: list[str], timeout: float = 60.0) -> None:
    before = {d: len(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, d)) for d in devices}
    await deploy(client, version, devices)
    await fleet.feed.wait_for(
        lambda _: all(
            any(e.payload["version"] == version
                for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, d)[before[d]:])
            for d in devices
        ),
        timeout=timeout, what=f"{devices} to apply kws/{version}",
    )


def last_assigned(fleet: Fleet, device: str) -> Entry:
    return fleet.feed.of_kind(ev.DEVICE_ASSIGNED, device)[-1]


# ---------------------------------------------------------------- forged documents


def forge_manifest(key: SigningKey, digest: str, size: int, version: str = "3",
                   expires_in_ns: int = HOUR_NS) -> bytes:
    now = time.time_ns()
    manifest = proto.ReleaseManifest(
        name="kws", version=version, digest=digest, size=size, format="tflite",
        inputs=[], outputs=[], created=now, expires=now + expires_in_ns,
    )
    return proto.SignedEnvelope.sign(manifest.to_map(), proto.DOMAIN_MANIFEST, [key]).encode()


def forge_assignment(key: SigningKey, device: str, manifest: bytes, counter: int,
                     expires_in_ns: int = HOUR_NS) -> bytes:
    doc = proto.SignedEnvelope.decode(manifest).document("manifest")
    now = time.time_ns()
    assignment = proto.Assignment(
        device=device, model=doc["name"], version=doc["version"], digest=doc["digest"],
        manifest_hash=blake3.blake3(manifest).hexdigest(), counter=counter, rollout="attack",
        issued_at=now, expires=now + expires_in_ns,
    )
    return proto.SignedEnvelope.sign(
        assignment.to_map(), proto.DOMAIN_ASSIGNMENT, [key]
    ).encode()


async def put_manifest(js: JetStreamContext, manifest: bytes) -> None:
    doc = proto.SignedEnvelope.decode(manifest).document("manifest")
    kv = await js.key_value(MANIFESTS_BUCKET)
    await kv.put(proto.manifest_key(doc["name"], doc["version"]), manifest)


async def put_assignment(js: JetStreamContext, device: str, data: bytes) -> None:
    kv = await js.key_value(ASSIGNMENTS_BUCKET)
    await kv.put(device, data)


def slot_snapshot(state_dir: Path) -> dict[str, Any]:
    """What is installed: the state file and both slot files, byte for byte."""
    files = [state_dir / "active.json", state_dir / "slots" / "a.tflite",
             state_dir / "slots" / "b.tflite"]
    return {p.name: p.read_bytes() if p.exists() else None for p in files}
