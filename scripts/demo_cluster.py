"""`scripts/demo --cluster`: the scale-out story on one machine.

Three nats-server nodes (the configurations `hub init --cluster 3` writes: routes,
JetStream at three replicas, the accounts on every node), a private PostgreSQL, two
`hub serve` processes on it (one leads by the lease, the other stands by) and a few
`edge-agent` processes that know every node. kws/1 is deployed to all; then a rollout
of kws/2 in two waves starts, and once the first wave is done the leading hub is
SIGKILLed: the standby takes the lease, finishes the rollout, and the ledger verifies.
Every line says what happened and when. Every process it started is stopped on the way
out (by its PID), also on Ctrl-C; PostgreSQL's directory is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import Engine, create_engine, text

from hub.client import HubClient
from hub.errors import HubError
from hub.home.config import HubConfig, init_home, load_config
from hub.home.nats_cluster import node_conf_path
from ledger.signing import SigningKey
from testkit.modelgen import model_for_version, write_validation_set
from testkit.nats_cluster import NatsCluster, free_port_run, wait_jetstream
from tests.pg import PgServer, PgUnavailable

LEASE_S = 3.0  # short, so the takeover is quick to watch (the default is 10 s)
console = Console()


def hub_command(home: Path) -> list[str]:
    return [sys.executable, "-m", "hub.cli", "serve", "--home", str(home), "--wait-nats", "60"]


def lease(engine: Engine) -> tuple[int, int]:
    """(epoch, pid) of the lease row; (0, 0) before the first hub made it."""
    with engine.connect() as conn:
        if not conn.execute(text("SELECT to_regclass('hub_leader') IS NOT NULL")).scalar():
            return 0, 0
        row = conn.execute(text("SELECT epoch, pid FROM hub_leader WHERE id = 1")).one()
    return int(row.epoch), int(row.pid)


async def until(check: Any, timeout: float, what: str, procs: Any) -> None:
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        if await check() if asyncio.iscoroutinefunction(check) else check():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.1)


class Story:
    def __init__(self, config: HubConfig, engine: Engine, procs: Any, data: Path) -> None:
        self.config, self.engine, self.procs, self.data = config, engine, procs, data
        self.admin_key = SigningKey.load(config.operator_key_path("admin"))
        self.t0 = time.monotonic()

    def say(self, line: str) -> None:
        console.print(f"[dim]{time.monotonic() - self.t0:6.1f} s[/dim]  {line}")

    async def client(self, key: SigningKey | None = None) -> HubClient:
        key = key or self.admin_key
        return await HubClient.connect(self.config.nats_url, key, timeout=20,
                                       auth=self.config.operator_auth(key))

    async def answers(self) -> bool:
        try:
            async with await self.client() as probe:
                await probe.call("status")
            return True
        except HubError:
            return False

    async def release(self, admin: HubClient, alice: HubClient, version: str) -> None:
        model = self.data / "models" / f"kws-v{version}.tflite"
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_bytes(model_for_version(int(version)))
        await admin.register_model(model, "kws", version)
        dataset = write_validation_set(model, model.with_suffix(".npz"))
        if not (await admin.validate_model("kws", version, dataset))["passed"]:
            raise RuntimeError(f"kws/{version} failed validation")
        await alice.call("model.approve", {"name": "kws", "version": version})
        await admin.call("model.release", {"name": "kws", "version": version})
        self.say(f"kws/{version} registered, validated, approved by alice, released")

    async def applied(self, admin: HubClient, version: str, devices: list[str]) -> int:
        rows: list[dict[str, Any]] = await admin.devices()
        return sum(1 for r in rows if r["device"] in devices and r["version"] == version
                   and r["state"] == "applied")


async def drive(story: Story, devices: list[str]) -> None:
    procs, config = story.procs, story.config
    hubs: dict[str, Any] = {}
    hubs["hub-a"] = procs.start("hub-a", hub_command(config.home))
    await until(lambda: lease(story.engine)[1] == hubs["hub-a"].pid, 90, "hub-a to lead",
                procs)
    story.say(f"hub-a (pid {hubs['hub-a'].pid}) holds the lease, epoch "
              f"{lease(story.engine)[0]}")
    hubs["hub-b"] = procs.start("hub-b", hub_command(config.home))
    await until(story.answers, 60, "the hub to answer", procs)
    story.say(f"hub-b (pid {hubs['hub-b'].pid}) started: it stands by, serving reads")
    alice_key = SigningKey.generate()
    async with await story.client() as admin:
        await admin.call("operator.add", {"name": "alice", "roles": ["approver"],
                                          "public": alice_key.public.raw})
        for device in devices:
            enrolled = await admin.call("device.enroll", {"device": device})
            procs.start(device, [
                sys.executable, "-m", "edge_agent.cli", "run", "--bundle", enrolled["bundle"],
                "--nats", config.nats_url, "--state-dir", str(story.data / "devices" / device),
                "--synthetic-load", "--rate", "10", "--window", "1"])
        story.say(f"{len(devices)} edge-agents started, each given all three NATS nodes")
        async with await story.client(alice_key) as alice:
            await story.release(admin, alice, "1")
            await admin.call("deploy", {"model": "kws", "version": "1", "all": True})

            async def all_on_1() -> bool:
                return await story.applied(admin, "1", devices) == len(devices)

            await until(all_on_1, 120, "every device to apply kws/1", procs)
            story.say("every device runs kws/1")
            await story.release(admin, alice, "2")
        rid = str((await admin.call("rollout.create", {
            "model": "kws", "version": "2", "target": "all", "waves": "50%,100%",
            "bake": "3s", "min_success": 1.0, "max_failure": 0.0,
            "deadline": "120s"}))["rollout"])
        await admin.call("rollout.start", {"rollout": rid})
        story.say(f"rollout {rid} of kws/2 started: two waves, 3 s bake each")

        async def status() -> dict[str, Any]:
            result: dict[str, Any] = await admin.call("rollout.status", {"rollout": rid})
            return result

        async def first_wave_done() -> bool:
            with contextlib.suppress(HubError):  # a poll that met the takeover
                return (await status())["waves"][0]["state"] == "done"
            return False

        await until(first_wave_done, 120, "the first wave", procs)
    epoch, pid = lease(story.engine)
    leader = next(name for name, proc in hubs.items() if proc.pid == pid)
    standby = next(name for name in hubs if name != leader)
    story.say(f"wave 1 done; SIGKILL {leader} (pid {pid}, the leader, epoch {epoch})")
    procs.forget(leader)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    await until(lambda: lease(story.engine)[1] == hubs[standby].pid, 60,
                f"{standby} to take over", procs)
    story.say(f"{standby} took the lease {time.monotonic() - killed:.1f} s later (lease "
              f"{LEASE_S:g} s), epoch {lease(story.engine)[0]}")
    async with await story.client() as admin:
        async def completed() -> bool:
            with contextlib.suppress(HubError):  # a poll that met the takeover
                result = await admin.call("rollout.status", {"rollout": rid})
                return bool(result["rollout"]["state"] == "completed")
            return False

        await until(completed, 120, "the rollout to complete", procs)
        done = await story.applied(admin, "2", devices)
    story.say(f"rollout {rid} completed under {standby}: {done} of {len(devices)} devices "
              "run kws/2")


def run(data: Path, procs: Any, devices: int) -> int:
    """The cluster demo in `data` (made and marked by scripts/demo.py); the exit code."""
    try:
        pg = PgServer().start()
    except PgUnavailable as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    cluster: NatsCluster | None = None
    engine: Engine | None = None
    try:
        database = pg.create_database("fleet")
        base = free_port_run(9)
        home = data / "hub"
        init_home(home, f"nats://127.0.0.1:{base}", database, cluster=3,
                  cluster_port=base + 3, leaf_port=base + 6)
        with open(home / "config.toml", "a") as fh:
            fh.write(f"leader_lease_seconds = {LEASE_S}\n")
        config = load_config(home)
        cluster = NatsCluster([node_conf_path(home, i) for i in (1, 2, 3)], data / "logs",
                              config.nats_url.split(",")).start()
        asyncio.run(wait_jetstream(cluster.url, **config.nats_auth("hub").options()))
        engine = create_engine(database)
        story = Story(config, engine, procs, data)
        nodes = ", ".join(f"{n.config_file.stem} pid {n.pid}" for n in cluster.nodes)
        story.say(f"NATS cluster of 3 ({nodes}); streams at {config.nats_replicas} replicas")
        story.say(f"PostgreSQL on 127.0.0.1:{pg.port} (pid of its postmaster: ours)")
        asyncio.run(drive(story, [f"dev-{i:02d}" for i in range(1, devices + 1)]))
        env = dict(os.environ, COLUMNS="110")
        subprocess.run([sys.executable, "-m", "hub.cli", "devices", "--home", str(home)],
                       env=env, check=True)
        verify = subprocess.run([sys.executable, "-m", "ledger.cli", "verify", "--home",
                                 str(home)], env=env, check=False)
        story.say("ledger verify: " + ("passed" if verify.returncode == 0 else "FAILED"))
        return verify.returncode
    except (RuntimeError, HubError, subprocess.CalledProcessError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    finally:
        procs.stop_all()
        if engine is not None:
            engine.dispose()
        if cluster is not None:
            cluster.close()
        pg.stop()
