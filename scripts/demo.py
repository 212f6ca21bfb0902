"""The walking-skeleton demo: one real model travels from the hub to five devices.

Starts a private nats-server with the configuration `hub init` wrote (a user per
identity: hub, operator, and one nkey per enrolled device, each confined by its
permissions; `--tls` adds TLS with the home's own CA), `hub serve` (SQLite ledger
under the data dir) and five `edge-agent` processes; registers v1, deploys it to all,
waits until every device reports it applied; then the same for v2; prints the fleet
and the ledger check. The hub serves its read-only dashboard (`hub serve --web`) on a
free loopback port, whose URL is printed first; `--keep` leaves everything running
afterwards (until Ctrl-C) to look around in it.
Every process it started is stopped on the way out, also on Ctrl-C.

Run it with `scripts/demo` (which sets up the virtual environment first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from hub.client import HubClient  # noqa: E402
from hub.errors import HubError  # noqa: E402
from hub.home.config import HubConfig, init_home, load_config, set_nats_url  # noqa: E402
from hub.home.nats_config import server_conf_path  # noqa: E402
from ledger.signing import SigningKey  # noqa: E402
from testkit.modelgen import model_for_version, write_validation_set  # noqa: E402
from testkit.nats_server import EmbeddedNats  # noqa: E402

console = Console()
BIN = Path(sys.executable).parent
PR_SET_PDEATHSIG = 1
# Written into --data DIR: only a directory holding it is wiped by the next run.
MARKER = ".fleetledger-demo"


def _die_with_parent() -> None:
    """Children get SIGTERM if the demo itself is killed, so nothing is orphaned."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Processes:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent, cwd=ROOT,
        )
        self.started.append((name, proc))
        return proc

    def forget(self, name: str) -> None:
        """No longer watch `name` (a process the demo is about to kill on purpose)."""
        self.started = [(n, p) for n, p in self.started if n != name]

    def check_alive(self) -> None:
        for name, proc in self.started:
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{tail}")

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


async def wait_for_version(
    client: HubClient, procs: Processes, version: str, devices: list[str], timeout: float
) -> None:
    with Progress(
        TextColumn("[bold]kws/{task.fields[version]}[/bold]"), BarColumn(),
        TextColumn("{task.completed}/{task.total} devices applied"), TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("rollout", total=len(devices), version=version)
        deadline = time.monotonic() + timeout
        while True:
            procs.check_alive()
            rows: list[dict[str, Any]] = await client.devices()
            failed = [r for r in rows if r["state"] == "failed"]
            if failed:
                raise RuntimeError(f"{failed[0]['device']} failed: {failed[0]['last_error']}")
            done = sum(1 for r in rows if r["version"] == version and r["state"] == "applied")
            progress.update(task, completed=done)
            if done == len(devices):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {len(devices)} devices applied v{version}")
            await asyncio.sleep(0.1)


async def wait_for_telemetry(client: HubClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows: list[dict[str, Any]] = await client.devices()
        if all((r["inferences"] or 0) > 0 for r in rows):
            return
        await asyncio.sleep(0.2)


async def drive(config: HubConfig, models: dict[str, Path], devices: list[str],
                procs: Processes, data: Path) -> None:
    url, home = config.nats_url, config.home
    admin_key = SigningKey.load(home / "operators" / "admin.key")
    auth = config.operator_auth(admin_key)  # each operator is its own NATS user (its key)
    deadline = time.monotonic() + 15
    while True:  # hub serve creates the buckets; wait until it answers
        try:
            async with await HubClient.connect(url, admin_key, timeout=2, auth=auth) as probe:
                await probe.call("status")
            break
        except HubError:
            procs.check_alive()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    # Four eyes: the admin registers, alice (an approver) approves.
    alice_key = SigningKey.generate()
    async with await HubClient.connect(url, admin_key, auth=auth) as admin:
        await admin.call("operator.add", {"name": "alice", "roles": ["approver"],
                                          "public": alice_key.public.raw})
        alice_key.save(home / "operators" / "alice.key")
        console.print("admin added operator alice (approver)")
        for device in devices:
            enrolled = await admin.call("device.enroll", {"device": device})
            # The bundle holds the device's own key (it signs its reports) and its root.
            procs.start(device, [
                str(BIN / "edge-agent"), "run", "--bundle", enrolled["bundle"], "--nats", url,
                "--state-dir", str(data / "devices" / device), "--synthetic-load", "--rate", "20",
                "--window", "1",
            ])
        console.print(f"enrolled and started {len(devices)} agents: {', '.join(devices)}")
        async with await HubClient.connect(url, alice_key,
                                           auth=config.operator_auth(alice_key)) as alice:
            for version in ("1", "2"):
                await release(admin, alice, models[version], version, data)
                await admin.call("deploy", {"model": "kws", "version": version, "all": True})
                await wait_for_version(admin, procs, version, devices, timeout=60)
        await wait_for_telemetry(admin, timeout=10)


async def release(admin: HubClient, alice: HubClient, model: Path, version: str,
                  data: Path) -> None:
    card = {"intended_use": "demo keyword spotter", "owners": ["demo team"]}
    lineage = {"code_ref": "demo", "params": {"version": int(version)}}
    result = await admin.register_model(model, "kws", version, lineage, card)
    console.print(f"admin registered kws/{version} (digest {result['digest'][:16]}…)")
    dataset = write_validation_set(model, data / "models" / f"kws-v{version}-validation.npz")
    report = await admin.validate_model("kws", version, dataset)
    if not report["passed"]:
        raise RuntimeError(f"validation failed: {report['failures']}")
    console.print(f"validation passed: accuracy {report['metrics'].get('accuracy', 0):.3f}, "
                  f"flip rate {report['metrics'].get('flip_rate', 0):.3f}")
    await alice.call("model.approve", {"name": "kws", "version": version})
    await admin.call("model.release", {"name": "kws", "version": version})
    console.print(f"alice approved, admin released kws/{version}; deploying to all devices")


def dashboard_url(procs: Processes, timeout: float = 30.0) -> str:
    """The dashboard's address as the hub logged it ("dashboard on URL"). With port 0 the
    hub binds a free port itself: no other process (a parallel test's server) can take
    it between a pick and the bind."""
    log = procs.logs / "hub.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"dashboard on (http://[^\s\"]+)", log.read_text(errors="replace"))
        if match:
            return match.group(1)
        procs.check_alive()
        time.sleep(0.1)
    raise RuntimeError(f"the hub did not log its dashboard address within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "demo-data",
                        help="working directory for this run (wiped at start if an earlier demo "
                        "made it; any other non-empty directory is refused)")
    parser.add_argument("--devices", type=int, default=None,
                        help="number of agents (default 5; 4 with --cluster)")
    parser.add_argument("--tls", action="store_true", help="NATS over TLS (the home's CA)")
    parser.add_argument("--no-auth", action="store_true",
                        help="a NATS server without users (authentication is on by default)")
    parser.add_argument("--web", metavar="ADDR:PORT", default=None,
                        help="where the hub serves its dashboard (default: a free port on "
                        "127.0.0.1)")
    parser.add_argument("--cluster", action="store_true",
                        help="the scale-out story instead: three NATS nodes, PostgreSQL, two "
                        "hubs; the leading hub is SIGKILLed mid-rollout and the other "
                        "completes it (scripts/demo_cluster.py; --devices 4 by default)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the hub, the agents and the dashboard running after the "
                        "demo, until Ctrl-C")
    args = parser.parse_args()
    data: Path = args.data.resolve()
    if data.exists() and any(data.iterdir()):
        if not (data / MARKER).is_file():
            console.print(f"[red]error:[/red] {data} is not empty and no demo made it (no "
                          f"{MARKER} file); not deleting it. Pass an empty or new --data DIR.")
            return 2
        shutil.rmtree(data)
    (data / "logs").mkdir(parents=True)
    (data / MARKER).write_text("made by scripts/demo; the next run may wipe this directory\n")
    if args.cluster:
        import demo_cluster  # scripts/ is on sys.path: this file's own directory

        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        procs = Processes(data / "logs")
        try:
            return demo_cluster.run(data, procs, args.devices or 4)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; stopping everything[/yellow]")
            procs.stop_all()
            return 130
    devices = [f"dev-{i:02d}" for i in range(1, (args.devices or 5) + 1)]
    models = {}
    for version in ("1", "2"):
        models[version] = data / "models" / f"kws-v{version}.tflite"
        models[version].parent.mkdir(parents=True, exist_ok=True)
        models[version].write_bytes(model_for_version(int(version)))

    # SIGTERM ends the demo like Ctrl-C does, through the same clean-up.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    home = data / "hub"
    # The home first: the server runs with the configuration `hub init` writes there.
    init_home(home, "nats://127.0.0.1:4222", nats_auth=not args.no_auth, tls=args.tls)
    nats_server = EmbeddedNats(store_dir=data / "nats",
                               config_file=None if args.no_auth else server_conf_path(home))
    procs = Processes(data / "logs")
    code = 0
    try:
        nats_server.start()
        set_nats_url(home, nats_server.url)
        security = "no authentication" if args.no_auth else (
            "users and per-device nkeys" + (", TLS" if args.tls else ""))
        console.print(f"nats-server {nats_server.url} (pid {nats_server.pid}; {security})")
        web = args.web or "127.0.0.1:0"
        procs.start("hub", [str(BIN / "hub"), "serve", "--home", str(home), "--web", web])
        web_url = dashboard_url(procs)
        console.print(f"dashboard (read-only): {web_url}")
        asyncio.run(drive(load_config(home), models, devices, procs, data))
        env = dict(os.environ, COLUMNS="110")
        subprocess.run([str(BIN / "hub"), "devices", "--home", str(home)], env=env, check=True)
        subprocess.run([str(BIN / "hub"), "model", "history", "kws", "--home", str(home)],
                       env=env, check=True)
        verify = subprocess.run([str(BIN / "ledger"), "verify", "--db", str(home / "ledger.db")])
        code = verify.returncode
        console.print(f"demo finished in {time.monotonic() - started:.1f} s; "
                      f"logs and ledger in {data}")
        if args.keep:
            console.print(f"still serving: dashboard {web_url} ; Ctrl-C stops everything")
            while True:
                procs.check_alive()
                time.sleep(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopping everything[/yellow]")
        code = 130
    except (RuntimeError, HubError, subprocess.CalledProcessError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish clean-up even on a second ^C
        procs.stop_all()
        nats_server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
