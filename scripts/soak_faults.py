#!/usr/bin/env python3
"""Fault soak: a few hundred real edge agents, a real hub and a real nats-server with
authentication on, rollouts running all the time, and faults injected at random for
--duration seconds. At the end every fault is healed and the invariants are printed;
the exit code is 0 only if all of them hold. Loopback only; figures printed, never
asserted by a test (a soak is a script, not a test).

    .venv/bin/python scripts/soak_faults.py [--devices 200] [--duration 600] [--seed 1]

Faults (one at a time, every --gap seconds on average, kind chosen at random):
  hub-kill       SIGKILL `hub serve`, restart it 1-5 s later (a crash, mid-append)
  hub-stall      SIGSTOP the hub for 2-8 s, then SIGCONT (a GC pause, a swapped host)
  nats-kill      SIGKILL nats-server, restart it on the same port and store 2-12 s later
  reset          reset every device's TCP connection (testkit.tcp_proxy), mid-download too
  partition      cut every device off for 3-20 s (connections stall, nothing is refused)
  agent-restart  stop 10% of the agents and start them again from their state directory

The devices reach nats-server through a TCP proxy (so a partition or reset hits them and
not the hub); the hub connects directly. An operator loop keeps a rollout going: when
none is active it creates and starts the next version's (3 waves, no bake), retrying a
command until it is acknowledged. The invariants after the faults stop:
  - a final rollout to one version completes with every device `applied`;
  - every rollout whose creation was acknowledged is in the ledger (`rollouts`);
  - telemetry: the inferences the hub counted == the inferences the agents produced;
  - `ledger verify` with the log key passes; `hub rebuild` gives the live state digest;
  - every hub background task is up; every agent task is still running;
  - the hub exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.client import HubClient  # noqa: E402
from hub.errors import HubError, Unreachable  # noqa: E402
from hub.home.config import init_home, load_config, set_nats_url  # noqa: E402
from hub.home.nats_config import server_conf_path  # noqa: E402
from ledger.signing import SigningKey  # noqa: E402
from testkit.fleet_sim import SimFleet  # noqa: E402
from testkit.modelgen import model_for_version, write_validation_set  # noqa: E402
from testkit.nats_server import EmbeddedNats  # noqa: E402
from testkit.tcp_proxy import TcpProxy  # noqa: E402

FAULTS = ("hub-kill", "hub-stall", "nats-kill", "reset", "partition", "agent-restart")
VERSIONS = ("1", "2", "3")
DONE = ("completed", "aborted")  # halted is still active: it can be resumed or rolled back


class Hub:
    """`hub serve` as its own process, restartable."""

    def __init__(self, home: Path, log_path: Path) -> None:
        self.home = home
        self.log = log_path.open("ab")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "serve", "--home", str(self.home),
             "--log-level", "WARNING", "--log-format", "plain"],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        self.starts += 1

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM and wait: the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            self.log.close()


async def until(fn: Any, timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = await fn()
            if value:
                return value
        except (HubError, OSError, TimeoutError) as exc:
            last = exc
        await asyncio.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}"
                       + (f" (last error: {last})" if last else ""))


class Operator:
    """An operator's CLI session that reconnects: HubClient is one CLI invocation's
    connection (no reconnect), and nats-server is killed during the soak."""

    def __init__(self, url: str, key: SigningKey, auth: Any) -> None:
        self.url, self.key, self.auth = url, key, auth
        self.client: HubClient | None = None
        self.reconnects = 0

    async def call(self, verb: str, body: dict[str, Any] | None = None) -> Any:
        if self.client is None:
            self.client = await HubClient.connect(self.url, self.key, timeout=30,
                                                  auth=self.auth)
            self.reconnects += 1
        try:
            return await self.client.call(verb, body)
        except Unreachable:
            with contextlib.suppress(Exception):
                await self.client.close()
            self.client = None
            raise

    async def register_model(self, path: Path, name: str, version: str) -> None:
        assert self.client is not None
        await self.client.register_model(path, name, version)

    async def validate_model(self, name: str, version: str, data: Path) -> None:
        assert self.client is not None
        await self.client.validate_model(name, version, data)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


async def call(client: Operator, verb: str, body: dict[str, Any] | None = None,
               timeout: float = 300.0) -> Any:
    """A command retried until the hub acknowledges it (the hub may be down for a while).
    A retried write may already have been applied, so writes here are chosen to be
    harmless twice or to fail clearly the second time (then the reply says so)."""
    return await until(lambda: client.call(verb, body or {}), timeout, verb, every=1.0)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="soak-faults-"))
        self.faults: Counter[str] = Counter()
        self.fault_log: list[str] = []
        self.acked_rollouts: list[str] = []
        self.halted: list[str] = []
        self.rollout_ends: Counter[str] = Counter()
        self.command_retries = 0
        self.reconnects = 0

    async def run(self) -> int:
        args = self.args
        home = self.tmp / "hub"
        init_home(home, "nats://127.0.0.1:4222", nats_auth=True)
        self.nats = EmbeddedNats(store_dir=self.tmp / "nats",
                                 config_file=server_conf_path(home)).start()
        set_nats_url(home, self.nats.url)
        config = load_config(home)
        self.proxy = await TcpProxy.start("127.0.0.1", self.nats.port)
        self.hub = Hub(home, self.tmp / "hub.log")
        self.hub.start()
        sim_dir = Path(tempfile.mkdtemp(prefix="soak-sim-", dir=args.sim_dir))
        fleet = SimFleet(self.proxy.url(), sim_dir, config.trust_root_path, args.devices,
                         prefix="s", rate=args.rate, window=args.window)
        self.fleet = fleet
        admin_key = SigningKey.load(config.operator_key_path("admin"))
        started = time.monotonic()
        code = 1
        try:
            admin = Operator(self.nats.url, admin_key, config.operator_auth(admin_key))
            await call(admin, "status")
            approver_key = SigningKey.generate()
            await admin.call("operator.add", {"name": "approver", "roles": ["approver"],
                                              "public": approver_key.public.raw})
            approver = Operator(self.nats.url, approver_key,
                                config.operator_auth(approver_key))
            for version in VERSIONS:
                path = self.tmp / f"soak-v{version}.tflite"
                path.write_bytes(model_for_version(int(version), extra_bytes=256 * 1024))
                await admin.register_model(path, "soak", version)
                data = write_validation_set(path, self.tmp / f"val-{version}.npz", rows=100)
                await admin.validate_model("soak", version, data)
                await approver.call("model.approve", {"name": "soak", "version": version})
                await admin.call("model.release", {"name": "soak", "version": version})
            assert admin.client is not None
            await fleet.enroll(admin.client, group="soak")
            await fleet.start()
            await fleet.wait_watching(180)
            print(f"set-up {time.monotonic() - started:.0f} s: {args.devices} agents "
                  f"watching, versions {', '.join(VERSIONS)} released; faults for "
                  f"{args.duration:.0f} s", flush=True)

            stop = asyncio.Event()
            operator = asyncio.create_task(self.operator(admin, stop))
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.duration:
                await asyncio.sleep(self.rng.uniform(0.5, 1.5) * args.gap)
                if time.monotonic() - t0 >= args.duration:
                    break
                await self.inject(self.rng.choice(FAULTS))
            stop.set()
            await operator
            self.heal()
            code = await self.check(admin, config)
            await admin.close()
            await approver.close()
        finally:
            await fleet.stop()
            exit_code = self.hub.stop()
            await self.proxy.close()
            self.nats.close()
            shutil.rmtree(sim_dir, ignore_errors=True)
            print(f"hub exit code on SIGTERM: {exit_code}; logs in {self.tmp}")
            if exit_code != 0:
                code = 1
        return code

    # ------------------------------------------------------------ faults

    async def inject(self, kind: str) -> None:
        rng = self.rng
        self.faults[kind] += 1
        self.fault_log.append(kind)
        if kind == "hub-kill":
            self.hub.kill()
            await asyncio.sleep(rng.uniform(1, 5))
            self.hub.start()
        elif kind == "hub-stall":
            self.hub.signal(signal.SIGSTOP)
            await asyncio.sleep(rng.uniform(2, 8))
            self.hub.signal(signal.SIGCONT)
        elif kind == "nats-kill":
            self.nats.kill()
            await asyncio.sleep(rng.uniform(2, 12))
            await asyncio.to_thread(self.nats.start)
        elif kind == "reset":
            self.proxy.reset_all()
        elif kind == "partition":
            self.proxy.partition()
            await asyncio.sleep(rng.uniform(3, 20))
            self.proxy.heal()
        elif kind == "agent-restart":
            devices = rng.sample(self.fleet.ids, max(1, len(self.fleet.ids) // 10))
            await self.fleet.restart(devices)
        print(f"  fault {len(self.fault_log):3d}: {kind}", flush=True)

    def heal(self) -> None:
        self.proxy.heal()
        self.hub.signal(signal.SIGCONT)
        if not self.hub.alive():
            self.hub.start()

    # ------------------------------------------------------------ operator

    async def operator(self, admin: Operator, stop: asyncio.Event) -> None:
        """Keep a rollout going: start one that was created (its start may have been lost
        with a fault), abort one that halted (as an operator would after a look), and
        when none is active, roll out the next version."""
        index = 0
        while not stop.is_set():
            try:
                rows = await admin.call("rollouts")
                for row in rows:
                    if row["state"] == "created":
                        await admin.call("rollout.start", {"rollout": row["rollout"]})
                    elif row["state"] == "halted":
                        self.halted.append(f"{row['rollout']}: {row.get('reason')}")
                        await admin.call("rollout.abort", {"rollout": row["rollout"]})
                if not [r for r in rows if r["state"] not in DONE]:
                    index += 1
                    await self.rollout(admin, VERSIONS[index % len(VERSIONS)], "10%,50%,100%")
            except (HubError, OSError, TimeoutError):
                self.command_retries += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)

    async def create(self, admin: Operator, version: str, waves: str) -> str:
        body = {"model": "soak", "version": version, "target": "group=soak",
                "waves": waves, "min_success": 0.9, "max_failure": 0.1,
                "deadline": f"{self.args.deadline:.0f}s"}
        rid = str((await admin.call("rollout.create", body))["rollout"])
        self.acked_rollouts.append(rid)
        return rid

    async def rollout(self, admin: Operator, version: str, waves: str) -> str:
        """Create and start (a start lost with a fault is retried by whoever sees the
        rollout still `created`)."""
        rid = await self.create(admin, version, waves)
        await admin.call("rollout.start", {"rollout": rid})
        return rid

    async def _ended(self, admin: Operator, rid: str) -> bool:
        rows = await admin.call("rollouts")
        row = next(r for r in rows if r["rollout"] == rid)
        if row["state"] == "created":  # the start was lost with a fault: again
            await admin.call("rollout.start", {"rollout": rid})
        return bool(row["state"] in DONE)

    # ------------------------------------------------------------ invariants

    async def check(self, admin: Operator, config: Any) -> int:
        n = self.args.devices
        results: list[tuple[str, bool, str]] = []
        print("faults stopped; healing and checking the invariants", flush=True)
        self.reconnects = admin.reconnects - 1  # the first connection is not one
        # A rollout left active by the soak finishes first (a halted one is aborted).
        await until(lambda: self._settle(admin), 900, "the last soak rollout to end",
                    every=2.0)
        rows = await call(admin, "rollouts")
        for row in rows:
            self.rollout_ends[row["state"]] += 1
        final = "1"
        rid = await until(lambda: self.create(admin, final, "100%"), 120, "final rollout")
        await until(lambda: self._ended(admin, rid), 600, f"rollout {rid}", every=1.0)
        row = next(r for r in await call(admin, "rollouts") if r["rollout"] == rid)
        applied = row["counts"].get("applied", 0)
        results.append(("final rollout completes, every device applied",
                        row["state"] == "completed" and applied == n,
                        f"{row['state']}, {applied}/{n} applied"))
        listed = {r["rollout"] for r in await call(admin, "rollouts")}
        missing = [r for r in self.acked_rollouts if r not in listed]
        results.append(("every acknowledged rollout is in the ledger", not missing,
                        f"{len(self.acked_rollouts)} acknowledged, {len(missing)} missing"))
        await self.fleet.quiesce(120)
        produced = self.fleet.produced()

        async def counted() -> int:
            tel = await admin.call("telemetry", {"device": "-"})
            return int(sum(r["inferences"] for r in tel["fleet"]))

        with contextlib.suppress(TimeoutError):
            await until(lambda: _equal(counted, produced), 180, "telemetry", every=1.0)
        got = await call(admin, "telemetry", {"device": "-"})
        hub_count = int(sum(r["inferences"] for r in got["fleet"]))
        results.append(("telemetry: counted by the hub == produced by the agents",
                        hub_count == produced,
                        f"{hub_count:,} counted, {produced:,} produced, "
                        f"{got['duplicates']} duplicates dropped"))
        status = await call(admin, "status")
        tasks = status.get("tasks", [])
        down = [t for t in tasks if t.get("state") != "running"]
        restarts = sum(int(t.get("restarts", 0)) for t in tasks)
        results.append(("every hub task is up", not down and bool(tasks),
                        f"{len(tasks)} tasks, {len(down)} not running, {restarts} restarts "
                        "in the last hub process"))
        dead = self.fleet.dead()
        results.append(("every agent is still running", not dead,
                        f"{n - len(dead)}/{n} running"))
        verify = self._cli("ledger.cli", "verify", "--home", str(config.home), "--log-key",
                           str(config.home / "log.vkey"), "--json")
        results.append(("ledger verify (log key) passes", verify[0] == 0, verify[1]))
        # The rebuild compares the live tables with a replay: the hub must not write
        # meanwhile, so it is stopped first (and started again for nothing else).
        code = self.hub.stop()
        results.append(("hub exits 0 on SIGTERM after the soak", code == 0, f"exit {code}"))
        rebuild = self._cli("hub.cli", "rebuild", "--home", str(config.home), "--json")
        results.append(("hub rebuild: state digest equal", rebuild[0] == 0, rebuild[1]))
        self.report(results)
        return 0 if all(ok for _, ok, _ in results) else 1

    async def _settle(self, admin: Operator) -> bool:
        rows = await admin.call("rollouts")
        for row in rows:
            if row["state"] == "created":
                await admin.call("rollout.start", {"rollout": row["rollout"]})
            elif row["state"] == "halted":
                self.halted.append(f"{row['rollout']}: {row.get('reason')}")
                await admin.call("rollout.abort", {"rollout": row["rollout"]})
        return not [r for r in rows if r["state"] not in DONE]

    def _cli(self, module: str, *argv: str) -> tuple[int, str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-m", module, *argv], env=env,
                              capture_output=True, text=True, timeout=300)
        summary = done.stdout.strip().splitlines()[-1:] or done.stderr.strip().splitlines()[-1:]
        with contextlib.suppress(ValueError, json.JSONDecodeError):
            doc = json.loads(done.stdout)
            summary = [", ".join(f"{k}={doc[k]}" for k in ("ok", "entries", "size", "equal")
                                 if k in doc)]
        return done.returncode, (summary[0] if summary else "")[:120]

    def report(self, results: list[tuple[str, bool, str]]) -> None:
        a = self.args
        print(f"\nsoak: {a.devices} devices, {a.duration:.0f} s of faults (seed {a.seed}, "
              f"one every ~{a.gap:.0f} s), hub started {self.hub.starts} times")
        print("| fault | injected |")
        print("|---|---|")
        for kind in FAULTS:
            print(f"| {kind} | {self.faults[kind]} |")
        ends = ", ".join(f"{k} {v}" for k, v in sorted(self.rollout_ends.items()))
        print(f"rollouts: {len(self.acked_rollouts) - 1} creations acknowledged during "
              f"the faults; in the ledger when they stopped: {sum(self.rollout_ends.values())}"
              f" ({ends}; a creation whose answer was lost to a fault is there "
              f"unacknowledged); operator calls that failed and were retried: "
              f"{self.command_retries}; operator reconnects: {self.reconnects}")
        for line in self.halted:
            print(f"halted (then aborted by the operator loop): {line}")
        print("| invariant | holds | detail |")
        print("|---|---|---|")
        for name, ok, detail in results:
            print(f"| {name} | {'yes' if ok else 'NO'} | {detail} |")


async def _equal(counted: Any, produced: int) -> bool:
    return bool(await counted() == produced)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of faults")
    p.add_argument("--gap", type=float, default=15.0, help="mean seconds between faults")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=1.0, help="inferences/s per device")
    p.add_argument("--window", type=float, default=5.0, help="telemetry window (s)")
    p.add_argument("--deadline", type=float, default=120.0,
                   help="rollout deadline (s): a device not applied by then fails its wave")
    p.add_argument("--sim-dir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
                   help="where the simulated devices keep their state (default: tmpfs)")
    args = p.parse_args()
    logging.basicConfig(level=logging.CRITICAL)

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # SIGTERM: run the clean-up (hub, nats-server) as Ctrl-C does

    signal.signal(signal.SIGTERM, interrupted)
    return asyncio.run(Soak(args).run())


if __name__ == "__main__":
    sys.exit(main())
