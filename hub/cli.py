"""`hub`: the operator's command line for the fleetledger control plane."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .client import HubClient, HubError
from .home import DEFAULT_HOME_ENV, HomeError, HubConfig, init_home, load_config

T = TypeVar("T")

app = typer.Typer(
    help=(
        "Operate the fleetledger hub: register models, enroll devices, deploy, and watch the "
        "fleet. Every action is recorded in the hash-chained ledger (check it with "
        "`ledger verify`).\n\nStart with `hub init DIR`, then `hub serve --home DIR`."
    ),
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(help="Register and list model versions.", no_args_is_help=True)
device_app = typer.Typer(help="Enroll devices.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(device_app, name="device")

out = Console()
err = Console(stderr=True)

HOME = typer.Option(
    Path("hub-home"), "--home", envvar=DEFAULT_HOME_ENV,
    help="Hub home directory made by `hub init` (env FLEET_HUB_HOME).",
)
NATS_URL = typer.Option(None, "--nats", help="NATS URL; overrides the one in config.toml.")
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
TIMEOUT = typer.Option(30.0, "--timeout", help="Seconds to wait for the hub to answer.")

EXIT_REFUSED = 1  # the hub refused the command
EXIT_USAGE = 2  # bad arguments or a missing/invalid home
EXIT_UNREACHABLE = 3  # NATS or the hub cannot be reached


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _config(home: Path, nats_url: str | None) -> HubConfig:
    try:
        return load_config(home, nats_url)
    except HomeError as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc


def _with_client(config: HubConfig, timeout: float, fn: Callable[[HubClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with await HubClient.connect(config.nats_url, timeout) as client:
            return await fn(client)

    try:
        return asyncio.run(go())
    except HubError as exc:
        unreachable = "cannot connect" in str(exc) or "no hub is serving" in str(exc)
        raise _fail(str(exc), EXIT_UNREACHABLE if unreachable else EXIT_REFUSED) from exc


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)))


def _ago(ts_ns: int | None) -> str:
    if not ts_ns:
        return "never"
    seconds = max(0.0, dt.datetime.now(dt.UTC).timestamp() - ts_ns / 1e9)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return dt.datetime.fromtimestamp(ts_ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# ---------------------------------------------------------------- set-up and serving


@app.command()
def init(
    home: Path = typer.Argument(..., help="Directory to create (keys, trust root, config)."),
    nats_url: str = typer.Option("nats://127.0.0.1:4222", "--nats", help="NATS server URL."),
    database: str = typer.Option(
        "ledger.db", "--database", help="SQLite file (relative to DIR) or a database URL."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing home's keys."),
) -> None:
    """Create a hub home: Ed25519 keys for the root, release, director and log roles,
    the signed trust root that devices pin (DIR/trust-root.bin), and DIR/config.toml."""
    try:
        config = init_home(home, nats_url, database, force)
    except HomeError as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc
    out.print(f"hub home ready in [bold]{home}[/bold]")
    out.print(f"  trust root for devices: {config.trust_root_path}")
    out.print(f"  ledger: {config.database_url()}")
    out.print(f"next: hub serve --home {home}")


@app.command()
def serve(
    home: Path = HOME,
    nats_url: str | None = NATS_URL,
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Run the hub: create the NATS buckets and streams, answer operator commands, and
    record device reports in the ledger. Stops cleanly on SIGTERM or Ctrl-C."""
    from .service import HubService

    logging.basicConfig(
        level=log_level.upper(), format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )
    config = _config(home, nats_url)

    async def main() -> None:
        service = HubService(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service.start()
        try:
            await stop.wait()
        finally:
            await service.stop()

    try:
        asyncio.run(main())
    except HomeError as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc
    except OSError as exc:
        raise _fail(f"cannot reach NATS at {config.nats_url}: {exc}", EXIT_UNREACHABLE) from exc


@app.command()
def status(home: Path = HOME, nats_url: str | None = NATS_URL, as_json: bool = JSON,
           timeout: float = TIMEOUT) -> None:
    """Show the ledger head as the running hub sees it."""
    config = _config(home, nats_url)
    result = _with_client(config, timeout, lambda c: c.call("status"))
    if as_json:
        _print_json(result)
    else:
        out.print(f"ledger: {result['entries']} entries, head {result['head'] or '-'}")
        out.print(f"refused reports since start: {result['refused_reports']}")


# ---------------------------------------------------------------- models


@model_app.command("register")
def model_register(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The .tflite file."),
    name: str = typer.Option(..., "--name", help="Model name, e.g. kws."),
    version: str = typer.Option(..., "--version", help="Version label, e.g. 3."),
    home: Path = HOME, nats_url: str | None = NATS_URL, as_json: bool = JSON,
    timeout: float = TIMEOUT,
) -> None:
    """Upload FILE to the Object Store under its BLAKE3 digest; the hub checks that it
    loads with the TFLite runtime, signs its release manifest and records it in the ledger."""
    config = _config(home, nats_url)
    result = _with_client(config, timeout, lambda c: c.register_model(file, name, version))
    if as_json:
        _print_json(result)
    else:
        out.print(f"registered and released [bold]{name}/{version}[/bold] "
                  f"digest {result['digest'][:16]}… (ledger seq {result['seq']})")


@model_app.command("list")
def model_list(home: Path = HOME, nats_url: str | None = NATS_URL, as_json: bool = JSON,
               timeout: float = TIMEOUT) -> None:
    """List registered model versions."""
    config = _config(home, nats_url)
    rows = _with_client(config, timeout, lambda c: c.call("models"))
    if as_json:
        _print_json(rows)
        return
    table = Table("model", "version", "state", "size", "digest")
    for r in rows:
        table.add_row(r["name"], r["version"], r["state"], f"{r['size']:,}", r["digest"][:16])
    out.print(table)


# ---------------------------------------------------------------- devices


@device_app.command("enroll")
def device_enroll(
    device_id: str = typer.Argument(..., help="Device id: letters, digits, '-' or '_'."),
    home: Path = HOME, nats_url: str | None = NATS_URL, as_json: bool = JSON,
    timeout: float = TIMEOUT,
) -> None:
    """Enroll a device so it can be deployed to. Give the device the trust-root file."""
    config = _config(home, nats_url)
    result = _with_client(config, timeout, lambda c: c.call("device.enroll",
                                                            {"device": device_id}))
    if as_json:
        _print_json(result)
    else:
        out.print(f"enrolled {device_id} (ledger seq {result['seq']}); start it with:")
        out.print(f"  edge-agent run --device-id {device_id} --nats {config.nats_url} "
                  f"--state-dir STATE --trust-root {config.trust_root_path}")


@app.command()
def devices(home: Path = HOME, nats_url: str | None = NATS_URL, as_json: bool = JSON,
            timeout: float = TIMEOUT) -> None:
    """The fleet: each device's model and version (as the device reported it), state,
    last seen, and inference counts from its telemetry."""
    config = _config(home, nats_url)
    rows = _with_client(config, timeout, lambda c: c.call("devices"))
    if as_json:
        _print_json(rows)
        return
    table = Table("device", "model/version", "state", "last seen", "inferences", "errors",
                  "p95 ms", title=f"{len(rows)} device(s)")
    for r in rows:
        running = f"{r['model']}/{r['version']}" if r["model"] else "-"
        state = r["state"]
        if state == "failed":
            state = f"[red]failed[/red]: {r['last_error'] or ''}"[:80]
        elif state == "assigned":
            state = f"assigned {r['assigned_model']}/{r['assigned_version']}"
        table.add_row(r["device"], running, state, _ago(r["last_seen"]),
                      f"{r['inferences'] or 0:,}", f"{r['errors'] or 0:,}",
                      f"{r['latency_ms_p95'] or 0:.2f}")
    out.print(table)


@app.command()
def deploy(
    model: str = typer.Option(..., "--model", help="Model name."),
    version: str = typer.Option(..., "--version", help="Model version."),
    device: list[str] = typer.Option([], "--device", help="Target device (repeatable)."),
    all_devices: bool = typer.Option(False, "--all", help="Target every enrolled device."),
    home: Path = HOME, nats_url: str | None = NATS_URL, as_json: bool = JSON,
    timeout: float = TIMEOUT,
) -> None:
    """Assign a released model version to devices: a signed assignment per device goes
    into the KV bucket the agents watch, and each is recorded in the ledger."""
    if bool(device) == all_devices:
        raise _fail("give --device ID (one or more) or --all, not both", EXIT_USAGE)
    config = _config(home, nats_url)
    body: dict[str, Any] = {"model": model, "version": version}
    body.update({"all": True} if all_devices else {"devices": device})
    result = _with_client(config, timeout, lambda c: c.call("deploy", body))
    if as_json:
        _print_json(result)
    else:
        out.print(f"{result['deployment']}: {model}/{version} assigned to "
                  f"{len(result['devices'])} device(s); watch with `hub devices`")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
