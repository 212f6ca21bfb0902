"""Two real `hub serve` processes on one PostgreSQL and one nats-server: one leads, the
other stands by (docs/ARCHITECTURE.md "Several hub processes, one leader").

- SIGKILL the leader in the middle of a rollout to simulated devices: the standby takes
  over (the time is measured and printed), the rollout completes, the chain verifies,
  the rebuilt state's digest equals the live one, every acknowledged operator command is
  in the ledger, and no rollout decision is there twice.
- SIGSTOP the leader past its lease, let the standby take over, SIGCONT it: it appends
  nothing after the takeover and becomes a standby; the telemetry the devices sent is
  counted exactly once across the two processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text

from hub import events as ev
from hub.client import HubClient
from hub.errors import HubError
from hub.home.config import HubConfig, load_config
from hub.rebuild import live_digest, rebuild_digest
from hub.telemetry.ingest import AGG
from ledger.signing import SigningKey
from ledger.storage.store import LedgerStore
from testkit.fleet_sim import SimFleet
from testkit.modelgen import write_validation_set
from testkit.nats_server import EmbeddedNats
from tests.fleet import REPO_ROOT

pytestmark = pytest.mark.timeout(150)
LEASE_S = 3.0  # short, so takeovers are quick here; the default is 10 s
N = 8


@dataclass
class Hubs:
    config: HubConfig
    engine: Engine
    nats_url: str
    tmp: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        with open(self.tmp / f"{name}.log", "ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hub.cli", "serve", "--home", str(self.config.home)],
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def leader(self) -> tuple[int, int, int]:
        """(epoch, pid, since_seq) of the lease row (pid 0: never taken)."""
        with self.engine.connect() as conn:
            row = conn.execute(text(
                "SELECT epoch, pid, since_seq FROM hub_leader WHERE id = 1")).one()
        return int(row.epoch), int(row.pid), int(row.since_seq)

    def processes(self) -> dict[int, Any]:
        """pid -> its heartbeat row, for the processes we started that are alive."""
        ours = {p.pid for p in self.procs.values() if p.poll() is None}
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM hub_processes")).all()
        return {r.pid: r for r in rows if r.pid in ours}

    def name_of(self, pid: int) -> str:
        return next(n for n, p in self.procs.items() if p.pid == pid)

    async def client(self, timeout: float = 5) -> HubClient:
        key = SigningKey.load(self.config.operator_key_path("admin"))
        return await HubClient.connect(self.nats_url, key, timeout=timeout,
                                       auth=self.config.operator_auth(key))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def enroll(hubs: Hubs, sim: SimFleet, **kwargs: str) -> None:
    """Enrol the simulated devices, all at once. Each enrolment rewrites the NATS users
    file, has nats-server check it (`-t`) and confirms the reload, one after the other:
    the last of N can wait many seconds on a busy machine, so the client waits 60 s, not
    the 5 s the other calls (which must fail fast while a leader is dead) wait."""
    async with await hubs.client(timeout=60) as admin:
        await sim.enroll(admin, **kwargs)


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
async def hubs(hub_home: HubConfig, fresh_pg_url: str, nats_server: EmbeddedNats,
               tmp_path: Path) -> AsyncIterator[Hubs]:
    path = hub_home.home / "config.toml"
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("database")]
    path.write_text("\n".join([*lines, f'database = "{fresh_pg_url}"',
                               f"leader_lease_seconds = {LEASE_S}"]) + "\n")
    config = load_config(hub_home.home)
    engine = create_engine(fresh_pg_url)
    hubs = Hubs(config, engine, nats_server.url, tmp_path)
    try:
        hubs.start("a")
        # The first process takes the lease; then the second stands by.
        await until(lambda: hubs.leader()[1] == hubs.procs["a"].pid
                    if _has_lease_table(engine) else False, 60, "hub a to lead")
        hubs.start("b")
        await until(lambda: len(hubs.processes()) == 2, 60, "both hubs to heartbeat")
        roles = Counter(r.role for r in hubs.processes().values())
        assert roles == {"leader": 1, "standby": 1}  # exactly one leads
        yield hubs
    finally:
        hubs.stop()
        engine.dispose()


def _has_lease_table(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT to_regclass('hub_leader') IS NOT NULL")).scalar())


async def release_model(hubs: Hubs, path: Path, version: str) -> None:
    approver = SigningKey.generate()
    async with await hubs.client() as admin:
        with contextlib.suppress(HubError):  # the second release: already added
            await admin.call("operator.add", {"name": "approver", "roles": ["approver"],
                                              "public": approver.public.raw})
        await admin.register_model(path, "kws", version)
        data = write_validation_set(path, hubs.tmp / f"kws-{version}-validation.npz")
        assert (await admin.validate_model("kws", version, data))["passed"]
    async with await HubClient.connect(
            hubs.nats_url, approver, timeout=5,
            auth=hubs.config.operator_auth(approver)) as appr:
        await appr.call("model.approve", {"name": "kws", "version": version})
    async with await hubs.client() as admin:
        await admin.call("model.release", {"name": "kws", "version": version})


def entries(hubs: Hubs) -> list[Any]:
    with LedgerStore.open(hubs.config.database_url(), create=False) as store:
        return list(store.iter_entries())


def of_kind(hubs: Hubs, kind: str, rollout: str) -> list[Any]:
    return [e for e in entries(hubs) if e.kind == kind and e.payload.get("rollout") == rollout]


async def takeover(hubs: Hubs, old_epoch: int, old_pid: int, t0: float) -> float:
    await until(lambda: hubs.leader()[0] > old_epoch and hubs.leader()[1] != old_pid,
                60, "the standby to take over")
    return time.monotonic() - t0


def check_ledger(hubs: Hubs) -> None:
    with LedgerStore.open(hubs.config.database_url(), create=False) as store:
        result = store.verify()
        assert result.ok, result.problem
        rebuilt, replayed = rebuild_digest(store)
        assert live_digest(store) == rebuilt and replayed == store.count()


async def test_leader_killed_mid_rollout_the_standby_completes_it(
    hubs: Hubs, model_files: dict[str, Path], tmp_path: Path
) -> None:
    await release_model(hubs, model_files["1"], "1")
    sim = SimFleet(hubs.nats_url, tmp_path / "sim", hubs.config.trust_root_path, N,
                   rate=4.0, window=0.5)
    acknowledged: list[str] = []
    try:
        await enroll(hubs, sim, group="lab")
        async with await hubs.client() as admin:
            await sim.start()
            rid = str((await admin.call("rollout.create", {
                "model": "kws", "version": "1", "target": "group=lab",
                "waves": "25%,50%,100%", "bake": "2s", "min_success": 1.0,
                "max_failure": 0.0, "deadline": "60s"}))["rollout"])
            await admin.call("rollout.start", {"rollout": rid})
            await until(lambda: bool(of_kind(hubs, ev.ROLLOUT_WAVE_COMPLETED, rid)), 60,
                        "the first wave to complete")

            stop_commands = asyncio.Event()

            async def commands() -> None:  # operator commands while the leader dies
                n = 0
                while not stop_commands.is_set():
                    device = f"op-{n:04d}"
                    n += 1
                    with contextlib.suppress(HubError):
                        await admin.call("device.enroll", {"device": device})
                        acknowledged.append(device)
                    await asyncio.sleep(0.02)

            stream = asyncio.create_task(commands())
            await until(lambda: len(acknowledged) >= 5, 30, "commands to be acknowledged")
            epoch, pid, _ = hubs.leader()
            killed = hubs.name_of(pid)
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            took = await takeover(hubs, epoch, pid, t0)
            print(f"\ntakeover after SIGKILL of the leader: {took:.2f} s (lease {LEASE_S} s)")
            assert took < 4 * LEASE_S + 10  # generous: the bound is lease + lease/4
            await until(lambda: bool(of_kind(hubs, ev.ROLLOUT_COMPLETED, rid)), 90,
                        "the rollout to complete under the new leader")
            stop_commands.set()
            await stream
            status = await admin.call("status")
        assert hubs.procs[killed].wait(timeout=10) == -signal.SIGKILL
    finally:
        await sim.stop()

    lead = status["leadership"]
    assert lead["leader"]["pid"] == hubs.leader()[1] != pid
    roles = {p["pid"]: p["role"] for p in lead["processes"]}
    assert roles.pop(pid, "deposed") == "deposed"  # the killed one, until it ages out
    assert list(roles.values()) == ["leader"]
    check_ledger(hubs)
    all_entries = entries(hubs)
    enrolled = {e.payload["device"] for e in all_entries if e.kind == ev.DEVICE_ENROLLED}
    missing = set(acknowledged) - enrolled
    assert not missing, f"acknowledged but not in the ledger: {sorted(missing)[:5]}"
    # No decision twice: each wave started and completed once, the rollout completed once.
    mine = [e for e in all_entries if e.payload.get("rollout") == rid]
    for kind in (ev.ROLLOUT_WAVE_STARTED, ev.ROLLOUT_WAVE_BAKING, ev.ROLLOUT_WAVE_COMPLETED):
        waves = Counter(e.payload["wave"] for e in mine if e.kind == kind)
        assert set(waves.values()) == {1}, (kind, waves)
    assert sum(e.kind == ev.ROLLOUT_COMPLETED for e in mine) == 1


async def test_a_paused_leader_wakes_fenced_and_telemetry_is_counted_once(
    hubs: Hubs, model_files: dict[str, Path], tmp_path: Path
) -> None:
    await release_model(hubs, model_files["1"], "1")
    sim = SimFleet(hubs.nats_url, tmp_path / "sim", hubs.config.trust_root_path, N,
                   rate=20.0, window=0.2)
    try:
        await enroll(hubs, sim)
        async with await hubs.client() as admin:
            await sim.start()
            await admin.call("deploy", {"model": "kws", "version": "1", "all": True})

            def applied() -> int:
                return len({e.subject for e in entries(hubs)
                            if e.kind == ev.DEVICE_UPDATE_APPLIED})

            await until(lambda: applied() == N, 60, "every device to apply kws/1")
            await until(lambda: counted(hubs) > 0, 30, "telemetry to be counted")
            epoch, pid, _ = hubs.leader()
            paused = hubs.name_of(pid)
            os.kill(pid, signal.SIGSTOP)  # past its lease: it renews nothing meanwhile
            t0 = time.monotonic()
            took = await takeover(hubs, epoch, pid, t0)
            print(f"\ntakeover after SIGSTOP of the leader: {took:.2f} s (lease {LEASE_S} s)")
            new_epoch, new_pid, since_seq = hubs.leader()
            # The new leader counts too (telemetry moves on while the old one sleeps).
            before = counted(hubs)
            await until(lambda: counted(hubs) > before, 30, "the new leader to count")
            os.kill(pid, signal.SIGCONT)
            await until(lambda: pid in hubs.processes()
                        and hubs.processes()[pid].role == "standby"
                        and hubs.processes()[pid].epoch == -1, 30,
                        "the woken leader to stand by")
            woke = hubs.processes()[pid]
            # It appended nothing after the takeover: its last leader append (if any)
            # is at or below the ledger's head when the new epoch began.
            assert woke.last_leader_seq <= since_seq
            assert hubs.leader()[:2] == (new_epoch, new_pid)  # nobody took it back
            log = hubs.log(paused)
            assert log.count("fenced: a leader-only append was refused") <= 1
            print(f"woken leader: {woke.fenced} fenced attempt(s); last leader append seq "
                  f"{woke.last_leader_seq}, new epoch {new_epoch} began at seq {since_seq}")
            # Telemetry: every inference the devices reported is counted, once, although
            # two processes were pulling from the REPORTS consumer.
            await sim.quiesce(timeout=60)
            produced = sim.produced()
            await until(lambda: counted(hubs) >= produced, 60,
                        f"telemetry counted {counted(hubs)} == sent {produced}")
            assert counted(hubs) == produced
            status = await admin.call("status")
        assert status["leadership"]["leader"]["pid"] == new_pid
        assert sorted(p["role"] for p in status["leadership"]["processes"]) == \
            ["leader", "standby"]
    finally:
        await sim.stop()
    check_ledger(hubs)


def counted(hubs: Hubs) -> int:
    with hubs.engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.sum(AGG.c.inferences), 0)))
                   .scalar_one())
