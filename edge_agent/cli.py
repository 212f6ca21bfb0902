"""`edge-agent`: run the device agent, or show what a device has installed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from edge_agent.errors import AgentError, DeviceBundleError, TransferError
from edge_agent.slots import SlotStore
from ledger.logs import LOG_FORMAT_HELP, configure_logging

# = edge_agent.agent.TASKS_NAME (not imported here: that module loads numpy and TFLite).
TASKS_NAME = "tasks.json"
STOP_GRACE_S = 10.0  # after SIGTERM: the agent's own shutdown is bounded well below this


def examples(*lines: str) -> str:
    """The `Examples:` section of a command's help (its epilog), one command per line."""
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)



app = typer.Typer(
    help=(
        "The fleetledger edge agent. It watches this device's signed assignment on NATS, "
        "verifies it against the pinned trust root, downloads and checks the model, installs "
        "it into an A/B slot, runs it with the TFLite runtime and reports back to the hub."
    ),
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "edge-agent run --bundle hub-home/devices/dev-1 --state-dir state/dev-1",
        "edge-agent keygen --bundle device-bundle",
        "edge-agent status --state-dir state/dev-1",
        "edge-agent predict input.npy --socket state/dev-1/agent.sock",
        "edge-agent --install-completion    (tab completion for your shell)",
    ),
)
err = Console(stderr=True)


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"edge-agent (fleetledger) {version('fleetledger')}")
        except PackageNotFoundError:  # a source tree that was never installed
            print("edge-agent (fleetledger) unknown")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_show_version,
                                       is_eager=True, help="Print the version and exit.")
          ) -> None:
    pass


@app.command(epilog=examples(
    "edge-agent run --bundle hub-home/devices/dev-1 --state-dir state/dev-1",
    "edge-agent run --bundle hub-home/devices/dev-1 --synthetic-load --rate 20",
    "edge-agent run --bundle hub-home/devices/dev-1 --require-inclusion",
    "edge-agent run --bundle hub-home/devices/dev-1 --nats nats://10.1.0.5:4222 --js-domain fleet",
    "edge-agent run --bundle hub-home/devices/dev-1 --log-format json",
))
def run(
    bundle: Path | None = typer.Option(
        None, "--bundle", help="Device bundle directory from `hub device enroll` (device.toml, "
        "device.key, trust-root.bin); the flags below override what it says.",
    ),
    device_id: str | None = typer.Option(
        None, "--device-id", help="This device's enrolled id (or from --bundle)."),
    nats_url: str | None = typer.Option(
        None, "--nats", help="NATS server URL the hub uses (default: the bundle's, else "
        "nats://127.0.0.1:4222)."
    ),
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="Directory for model slots and agent state (survives "
        "restarts); default BUNDLE/state."
    ),
    trust_root: Path | None = typer.Option(
        None, "--trust-root", help="The pinned trust-root file (or from --bundle)."
    ),
    device_key: Path | None = typer.Option(
        None, "--device-key", help="This device's Ed25519 key (or from --bundle); it signs "
        "status reports. Without one the agent runs but the hub refuses its reports."
    ),
    synthetic_load: bool = typer.Option(
        False, "--synthetic-load",
        help="Also run the model on generated random inputs at --rate, for demos and "
        "benchmarks (telemetry then describes noise). Off: only real calls through the "
        "local inference API are run and counted.",
    ),
    rate: float = typer.Option(
        20.0, "--rate", help="Inferences per second on generated inputs, with "
        "--synthetic-load (0 = none)."
    ),
    api_socket: Path | None = typer.Option(
        None, "--api-socket", help="Unix socket of the local inference API (default "
        "STATE_DIR/agent.sock). It is created mode 0660: the agent's user and group may call."
    ),
    no_api: bool = typer.Option(
        False, "--no-api", help="Do not serve the local inference API."),
    window: float = typer.Option(5.0, "--window", help="Telemetry window length in seconds."),
    health_window: float = typer.Option(
        30.0, "--health-window",
        help="Seconds to watch a newly installed model; a load failure, too many inference "
        "errors or 3 restarts in this window revert to the previous model (0 = off).",
    ),
    max_error_rate: float = typer.Option(
        0.5, "--max-error-rate",
        help="Inference error rate (0-1) in the health window above which the agent reverts.",
    ),
    js_domain: str | None = typer.Option(
        None, "--js-domain", help="The hub cluster's JetStream domain, for a device that "
        "connects to an edge site's leaf node (`hub site add` prints it: fleet)."),
    require_inclusion: bool = typer.Option(
        False, "--require-inclusion",
        help="Model transparency: install a release only with a proof that its ledger entry "
        "is in a checkpoint signed by the log and cosigned by the trust root's witness "
        "threshold; wait while it is not witnessed yet (or set require_inclusion = true "
        "in the bundle's device.toml).",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    log_format: str = typer.Option("auto", "--log-format", help=LOG_FORMAT_HELP),
) -> None:
    """Run the agent until SIGTERM or Ctrl-C. While NATS is unreachable or refuses this
    device (unauthorised: not enrolled, or revoked) it keeps trying with exponential
    backoff, one log line per attempt. Exit status: 0 when stopped by SIGTERM or Ctrl-C
    (at any point, also while connecting), 2 for a set-up error, 4 when a task of the
    agent failed for 10 minutes without a stable run (it cannot work: let the service
    manager restart it)."""
    from edge_agent.agent import AgentConfig, EdgeAgent  # numpy/TFLite only when actually running
    from edge_agent.bundle import DeviceBundle

    if bundle is not None:
        try:
            b = DeviceBundle.load(bundle)
        except DeviceBundleError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(2) from exc
        device_id = device_id or b.device_id
        nats_url = nats_url or b.nats_url
        trust_root = trust_root or b.trust_root
        device_key = device_key or b.device_key
        nats_ca = b.nats_ca
        require_inclusion = require_inclusion or b.require_inclusion
        state_dir = state_dir or bundle / "state"
    else:
        nats_ca = None
    missing = [flag for flag, value in (("--device-id", device_id), ("--state-dir", state_dir),
                                        ("--trust-root", trust_root)) if value is None]
    if missing:
        err.print(f"[red]error:[/red] give --bundle DIR, or {', '.join(missing)}")
        raise typer.Exit(2)
    assert device_id is not None and state_dir is not None and trust_root is not None
    nats_url = nats_url or "nats://127.0.0.1:4222"
    try:
        configure_logging(log_level, log_format, prefix=f"{device_id} ")
    except ValueError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    try:
        agent = EdgeAgent(
            AgentConfig(
                device_id=device_id, nats_url=nats_url, state_dir=state_dir,
                trust_root=trust_root, inference_hz=rate, synthetic_load=synthetic_load,
                serve_api=not no_api, api_socket=api_socket, window_seconds=window,
                health_window=health_window, max_error_rate=max_error_rate,
                device_key=device_key, nats_ca=nats_ca, require_inclusion=require_inclusion,
                js_domain=js_domain,
            )
        )
    except (AgentError, OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        run = asyncio.create_task(agent.run(stop))
        await asyncio.wait({run, asyncio.create_task(stop.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
        # Stopping: the agent flushes and closes itself (bounded); never wait for ever.
        done, _ = await asyncio.wait({run}, timeout=STOP_GRACE_S)
        if not done:
            logging.getLogger("edge_agent").warning(
                "did not stop within %.0f s; exiting anyway", STOP_GRACE_S)
            run.cancel()
            return
        run.result()
        if agent.fatal_reason:
            err.print(f"[red]error:[/red] the agent cannot work: {escape(agent.fatal_reason)}")
            raise typer.Exit(4)

    try:
        asyncio.run(main())
    except (OSError, TransferError) as exc:  # unreachable, or refused (no/revoked identity)
        err.print(f"[red]error:[/red] cannot reach NATS at {escape(nats_url)}: {escape(str(exc))}")
        raise typer.Exit(3) from exc


@app.command(epilog=examples(
    "edge-agent keygen --bundle device-bundle",
    "edge-agent keygen --bundle device-bundle --json",
))
def keygen(
    bundle: Path = typer.Option(
        ..., "--bundle", help="Directory for this device's bundle; the key is written to "
        "BUNDLE/device.key (0600)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Make this device's own Ed25519 key (it signs its reports and is its NATS
    identity) and print its public half; the private key never leaves the device. Then
    enrol with `edge-agent enroll` and a token from `hub device token create`.

    Exit status: 0 ok, 2 a key is there already (without --force) or cannot be written.
    """
    from edge_agent.enrol import keygen as make_key

    try:
        key = make_key(bundle, force)
    except (DeviceBundleError, OSError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    info = {"key": str(bundle / "device.key"), "keyid": key.keyid,
            "public": key.public.raw.hex()}
    if as_json:
        print(json.dumps(info))
        return
    print(f"device key {info['keyid']} written to {info['key']}")
    print(f"public key: {info['public']}")


@app.command(epilog=examples(
    "edge-agent enroll --bundle device-bundle --device-id dev-7 --token TOKEN "
    "--hub nats://enrol:PASSWORD@127.0.0.1:4222",
    "edge-agent enroll --bundle device-bundle --device-id dev-7 --token TOKEN "
    "--hub tls://enrol:PASSWORD@hub.example:4222 --ca ca.pem --json",
))
def enroll(
    bundle: Path = typer.Option(
        ..., "--bundle", help="The directory `edge-agent keygen` wrote the key to; the "
        "bundle (device.toml, trust-root.bin, ca.pem) is written next to it."),
    device_id: str = typer.Option(..., "--device-id", help="The id the token was made for."),
    token: str = typer.Option(
        ..., "--token", envvar="FLEET_ENROL_TOKEN",
        help="The one-time token from `hub device token create` (or FLEET_ENROL_TOKEN)."),
    hub_url: str = typer.Option(
        ..., "--hub", help="The hub's NATS URL with the `enrol` user's password in it "
        "(`hub device token create` prints it)."),
    ca: Path | None = typer.Option(
        None, "--ca", help="The NATS server's CA certificate (servers with TLS)."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the hub."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Enrol this device with its own key (from `edge-agent keygen`) and a one-time
    token: the hub checks the token (for this device id, unexpired, unused), records the
    public key, and answers what the device needs to connect; it is written as a device
    bundle for `edge-agent run --bundle`.

    Exit status: 0 enrolled, 1 refused by the hub (bad, expired or used token, key in
    use, already enrolled), 2 usage (no key, bad device id), 3 the hub did not answer.
    """
    from edge_agent.enrol import (
        EnrolmentRefused,
        enrolment_request,
        load_key,
        send_request,
        write_bundle,
    )

    try:
        key = load_key(bundle)
        data = enrolment_request(device_id, key, token)
    except (DeviceBundleError, ValueError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    try:
        result = asyncio.run(send_request(hub_url, data, ca, timeout))
        write_bundle(bundle, device_id, result)
    except EnrolmentRefused as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    except TransferError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(3) from exc
    info = {"device": device_id, "keyid": key.keyid, "bundle": str(bundle),
            "nats_url": result.get("nats_url")}
    if as_json:
        print(json.dumps(info))
        return
    print(f"enrolled {device_id} with its own key {key.keyid}; bundle in {bundle}; "
          f"start it with:\n  edge-agent run --bundle {bundle}")


@app.command(epilog=examples(
    "edge-agent status --state-dir state/dev-1",
    "edge-agent status --state-dir state/dev-1 --json",
))
def status(
    state_dir: Path = typer.Option(..., "--state-dir", help="The agent's state directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Show the installed model (active slot), the one kept for revert, and the state of
    the agent's tasks as it last wrote them (`agent.running`: its process is alive)."""
    slots = SlotStore(state_dir)
    active, previous = slots.active(), slots.previous()
    counter = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        counter = json.loads((state_dir / "agent.json").read_text())["last_counter"]
    tasks = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        saved = json.loads((state_dir / TASKS_NAME).read_text())
        running = Path(f"/proc/{int(saved['pid'])}").exists()
        tasks = {"pid": saved["pid"], "running": running, "tasks": saved["tasks"]}
    info = {
        "active": None if active is None else {"slot": active.name, **active.metadata},
        "previous": None if previous is None else {"slot": previous.name, **previous.metadata},
        "last_counter": counter,
        "agent": tasks,
    }
    if as_json:
        print(json.dumps(info))
        return
    Console().print_json(json.dumps(info))
    if active is None:
        raise typer.Exit(1)


@app.command(epilog=examples(
    "edge-agent predict input.npy --socket state/dev-1/agent.sock",
    "edge-agent predict inputs.npz --socket state/dev-1/agent.sock --json",
))
def predict(
    inputs: Path = typer.Argument(
        ..., help="INPUT.npy (the model's one input) or INPUT.npz (arrays named by input "
        "name, or arr_0, arr_1... in input order)."),
    socket_path: Path = typer.Option(
        ..., "--socket", help="The agent's inference socket (STATE_DIR/agent.sock)."),
    as_json: bool = typer.Option(False, "--json", help="Print the outputs as JSON."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds to wait for the agent."),
) -> None:
    """Run the installed model once on inputs from a file and print its outputs.

    Exit status: 0 ok, 1 the agent refused the inputs (or the model failed), 2 the
    file is unreadable, 3 no agent answers on the socket.
    """
    from edge_agent.serving.predict_cli import run_predict

    raise typer.Exit(run_predict(inputs, socket_path, as_json, timeout))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
