"""What every `hub` command group shares: options, consoles, the hub connection, output.

Errors: commands raise `hub.errors` types (the client raises `Unreachable` or `Refused`,
set-up problems are `UsageError`) and `HubGroup`, the root command group, turns any
`HubError` into one `error:` line and `exc.exit_code`. That is the only place the CLI
chooses an exit code for an error; nothing reads a message to pick one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from hub.client import HubClient
from hub.errors import EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, HubError, UsageError
from hub.home.config import DEFAULT_HOME_ENV, HubConfig, load_config
from ledger.errors import KeyFileError
from ledger.signing import SigningKey

__all__ = [
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "HOME",
    "JSON",
    "KEY",
    "NATS_URL",
    "TIMEOUT",
    "HubGroup",
    "ago",
    "call",
    "err",
    "fail",
    "hub_config",
    "model_ref",
    "operator_key",
    "out",
    "print_json",
    "run",
    "show",
    "utc_time",
]

T = TypeVar("T")

out = Console()
err = Console(stderr=True)

HOME = typer.Option(
    Path("hub-home"), "--home", envvar=DEFAULT_HOME_ENV,
    help="Hub home directory made by `hub init` (env FLEET_HUB_HOME).",
)
NATS_URL = typer.Option(None, "--nats", help="NATS URL; overrides the one in config.toml.")
KEY = typer.Option(
    None, "--key", envvar="FLEET_OPERATOR_KEY",
    help="Your operator key file (env FLEET_OPERATOR_KEY; default HOME/operators/admin.key).",
)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
TIMEOUT = typer.Option(60.0, "--timeout", help="Seconds to wait for the hub to answer.")


def fail(message: str, code: int) -> typer.Exit:
    """Print one `error:` line; the caller raises the returned Exit."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


class HubGroup(TyperGroup):
    """The root command group: every command runs inside its `invoke`, so a `HubError`
    from any of them is caught here, once, and becomes its exit code."""

    # `ctx` is typer's click Context; typer keeps that module private, hence Any.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except HubError as exc:
            raise fail(str(exc), exc.exit_code) from exc


def hub_config(home: Path, nats_url: str | None) -> HubConfig:
    return load_config(home, nats_url)  # HomeError is a UsageError: exit 2


def operator_key(config: HubConfig, key_path: Path | None) -> SigningKey:
    path = key_path or config.operator_key_path("admin")
    try:
        return SigningKey.load(path)
    except KeyFileError as exc:
        raise UsageError(f"{exc}; pass your operator key with --key") from exc


def run(config: HubConfig, key: Path | None, timeout: float,
        fn: Callable[[HubClient], Awaitable[T]]) -> T:
    """Connect as the operator whose key is `key`, run `fn` with the client, close."""
    signing_key = operator_key(config, key)

    async def go() -> T:
        async with await HubClient.connect(config.nats_url, signing_key, timeout,
                                           config.operator_auth(signing_key)) as client:
            return await fn(client)

    return asyncio.run(go())


def call(config: HubConfig, key: Path | None, timeout: float, verb: str,
         body: dict[str, Any] | None = None) -> Any:
    """One signed command; the hub's result."""
    return run(config, key, timeout, lambda c: c.call(verb, body or {}))


def print_json(value: Any) -> None:
    print(json.dumps(value, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)))


def show(result: T, as_json: bool, render: Callable[[T], object]) -> T:
    """`result` as JSON with --json, else as `render` draws it for a person."""
    if as_json:
        print_json(result)
    else:
        render(result)
    return result


def utc_time(ts_ns: int | None) -> str:
    if not ts_ns:
        return "-"
    return dt.datetime.fromtimestamp(ts_ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ago(ts_ns: int | None) -> str:
    if not ts_ns:
        return "never"
    seconds = max(0.0, dt.datetime.now(dt.UTC).timestamp() - ts_ns / 1e9)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return utc_time(ts_ns)


def model_ref(ref: str) -> tuple[str, str]:
    """NAME/VERSION split in two."""
    name, sep, version = ref.partition("/")
    if not sep or not name or not version:
        raise UsageError(f"expected NAME/VERSION, got {ref!r}")
    return name, version
