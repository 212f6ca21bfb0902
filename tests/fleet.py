"""Test harness: a real nats-server, a real hub, real agent processes.

Waiting is done on events (ledger entries as the hub publishes them on
`ledger.entry`), each with a timeout; never by sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from edge_agent.transport.connect import NO_AUTH, NatsAuth
from edge_agent.transport.connect import connect as nats_connect
from hub.client import HubClient
from hub.errors import HubError
from hub.home.config import HubConfig, init_home, load_config
from hub.service.app import HubService
from ledger.entry import Entry
from ledger.signing import SigningKey
from testkit.modelgen import write_validation_set

REPO_ROOT = Path(__file__).resolve().parent.parent


def url_as(config: HubConfig, role: str = "hub") -> str:
    """config.nats_url with the role's NATS user and password in it (none: unchanged)."""
    auth = config.nats_auth(role)
    if auth.user is None:
        return config.nats_url
    scheme, rest = config.nats_url.split("://", 1)
    return f"{scheme}://{auth.user}:{auth.password}@{rest}"


class LedgerFeed:
    """Collects entries from the hub's live ledger feed."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._changed = asyncio.Event()
        self._nc: NATS | None = None

    async def start(self, url: str, auth: NatsAuth = NO_AUTH) -> None:
        # Through the retrying connect: a users-file reload may refuse a handshake.
        self._nc = await nats_connect(url, auth, name="test-feed")
        await self._nc.subscribe("ledger.entry", cb=self._on_entry)

    async def _on_entry(self, msg: Msg) -> None:
        headers = msg.headers or {}
        entry = Entry.from_body(
            msg.data, bytes.fromhex(headers["Ledger-Prev"]), bytes.fromhex(headers["Ledger-Hash"])
        )
        self.entries.append(entry)
        self._changed.set()

    async def wait_for(
        self, predicate: Callable[[list[Entry]], bool], timeout: float = 30.0, what: str = ""
    ) -> list[Entry]:
        async def until() -> None:
            while not predicate(self.entries):
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            kinds = [(e.seq, e.kind, e.subject) for e in self.entries[-10:]]
            raise AssertionError(f"timed out waiting for {what}; last entries: {kinds}") from None
        return self.entries

    def of_kind(self, kind: str, device: str | None = None) -> list[Entry]:
        return [
            e for e in self.entries
            if e.kind == kind and (device is None or e.subject == f"device:{device}")
        ]

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 5)


@dataclass
class AgentProcess:
    device_id: str
    nats_url: str
    state_dir: Path
    trust_root: Path
    log_path: Path
    rate: float = 50.0
    window: float = 0.5
    # Inferences on generated inputs (--synthetic-load) at `rate`, so telemetry flows
    # without an application; tests of the inference API turn it off.
    synthetic_load: bool = True
    # The device bundle from enrolment (device key, pinned root); used when it exists.
    bundle: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def command(self, extra: list[str] | None = None) -> list[str]:
        """`edge-agent run` for this device: with its bundle if enrolment wrote one (the
        bundle's key signs reports and its root is the one pinned at enrolment)."""
        if self.bundle is not None and (self.bundle / "device.toml").exists():
            identity = ["--bundle", str(self.bundle)]
        else:
            identity = ["--trust-root", str(self.trust_root)]
        return [
            sys.executable, "-m", "edge_agent.cli", "run", *identity,
            "--device-id", self.device_id, "--nats", self.nats_url,
            "--state-dir", str(self.state_dir),
            *(["--synthetic-load"] if self.synthetic_load else []),
            "--rate", str(self.rate), "--window", str(self.window),
            "--log-level", "DEBUG", *(extra or []),
        ]

    def start(self) -> AgentProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env,
            )
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Fleet:
    """A hub (in this process) plus agents (child processes) on one nats-server."""

    root: Path
    nats_url: str
    config: HubConfig = field(init=False)
    hub: HubService = field(init=False)
    feed: LedgerFeed = field(init=False)
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    async def start(self) -> Fleet:
        home = self.root / "hub"
        if (home / "config.toml").exists():  # made by the hub_home fixture (NATS auth on)
            self.config = load_config(home, self.nats_url)
        else:
            self.config = init_home(home, self.nats_url)
        self.hub = HubService(self.config)
        await self.hub.start()
        self.feed = LedgerFeed()
        await self.feed.start(self.nats_url, self.config.nats_auth("hub"))
        self.admin_key = SigningKey.load(self.config.operator_key_path("admin"))
        self.approver_key = SigningKey.generate()
        async with await self.client() as admin:
            await admin.call("operator.add", {"name": "approver", "roles": ["approver"],
                                              "public": self.approver_key.public.raw})
        return self

    async def client(self, key: SigningKey | None = None, role: str = "operator") -> HubClient:
        """A connected operator client (the admin unless another key is given). It is on
        NATS as that operator (its key is its nkey); role="hub" is for tests whose raw NATS
        traffic plays an attacker with write access (a forged KV entry, a tampered blob, a
        bad report)."""
        key = key or self.admin_key
        auth = (self.config.operator_auth(key) if role == "operator"
                else self.config.nats_auth(role))
        return await HubClient.connect(self.nats_url, key, auth=auth)

    def url_as(self, role: str = "hub") -> str:
        """The NATS URL with a role's user and password in it (`nats://user:pw@host:port`),
        for tools that take only a URL (`ledger witness --nats`) and side connections."""
        return url_as(self.config, role)

    async def connect(self, role: str = "hub", name: str = "test") -> NATS:
        """A side connection to the fleet's NATS server as `hub`, `operator` or `witness`."""
        return await nats_connect(self.nats_url, self.config.nats_auth(role), name=name)

    async def release_model(self, path: Path, name: str, version: str) -> dict[str, object]:
        """Walk a model through the whole lifecycle: register, validate, approve, release."""
        async with await self.client() as admin, await self.client(self.approver_key) as appr:
            registered = await admin.register_model(path, name, version)
            data = write_validation_set(path, self.root / f"{name}-{version}-validation.npz")
            result = await admin.validate_model(name, version, data)
            assert result["passed"], result["failures"]
            await appr.call("model.approve", {"name": name, "version": version})
            await admin.call("model.release", {"name": name, "version": version})
        return dict(registered)

    def agent(self, device_id: str) -> AgentProcess:
        if device_id not in self.agents:
            self.agents[device_id] = AgentProcess(
                device_id, self.nats_url, self.root / "devices" / device_id,
                self.config.trust_root_path, self.root / f"{device_id}.log",
                bundle=self.bundle(device_id),
            )
        return self.agents[device_id]

    def bundle(self, device_id: str) -> Path:
        """Where `device.enroll` writes the device's bundle."""
        return self.config.home / "devices" / device_id

    async def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        await self.feed.close()
        await self.hub.stop()


def ledger_state(fleet: Fleet) -> tuple[int, bytes | None]:
    head = fleet.hub.store.head()
    return fleet.hub.store.count(), None if head is None else head.hash


async def refused(fleet: Fleet, client: HubClient, verb: str, body: dict[str, Any],
                  *words: str) -> str:
    """`verb` must be refused with a message holding `words`, append nothing, and leave
    the chain verifying."""
    before = ledger_state(fleet)
    with pytest.raises(HubError) as info:
        answer = await client.call(verb, body)
        if isinstance(answer, dict) and "job" in answer:  # refused when the job ends
            await client.wait_validation(str(answer["job"]))
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert ledger_state(fleet) == before
    assert fleet.hub.store.verify().ok
    return message
