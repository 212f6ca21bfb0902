"""What every `hub` command group shares: options, consoles, the hub connection, output.

Errors: commands raise `hub.errors` types (the client raises `Unreachable` or `Refused`,
set-up problems are `UsageError`) and `HubGroup`, the root command group, turns any
`HubError` into one `error:` line and `exc.exit_code`. That is the only place the CLI
chooses an exit code for an error; nothing reads a message to pick one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column
from typer.core import TyperGroup

from hub.client import HubClient
from hub.errors import EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, HubError, UsageError
from hub.home.config import DEFAULT_HOME_ENV, HubConfig, load_config
from ledger.errors import KeyFileError
from ledger.json_output import emit
from ledger.signing import SigningKey

__all__ = [
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "HELP_OPTIONS",
    "HOME",
    "JSON",
    "KEY",
    "NATS_URL",
    "TIMEOUT",
    "HubGroup",
    "ago",
    "call",
    "err",
    "examples",
    "fail",
    "hub_config",
    "key_column",
    "model_ref",
    "operator_key",
    "out",
    "package_version",
    "print_json",
    "resolve_ref",
    "rfc3339",
    "run",
    "show",
    "utc_time",
    "version_option",
    "wait_for_port",
]

T = TypeVar("T")

out = Console()
err = Console(stderr=True)

# Whether the running command was given --home (or FLEET_HUB_HOME): without it, the
# current context (`hub context use`) is used before the ./hub-home default.
_home_given = True


def _note_home(ctx: typer.Context, value: Path) -> Path:
    global _home_given
    source = ctx.get_parameter_source("home")
    _home_given = source is None or source.name != "DEFAULT"
    return value


HOME = typer.Option(
    Path("hub-home"), "--home", envvar=DEFAULT_HOME_ENV, callback=_note_home,
    help="Hub home directory made by `hub init` (env FLEET_HUB_HOME; without it, the "
    "current `hub context`, else ./hub-home).",
)
NATS_URL = typer.Option(None, "--nats", help="NATS URL; overrides the one in config.toml.")
KEY = typer.Option(
    None, "--key", envvar="FLEET_OPERATOR_KEY",
    help="Your operator key file (env FLEET_OPERATOR_KEY; default HOME/operators/admin.key).",
)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
TIMEOUT = typer.Option(60.0, "--timeout", help="Seconds to wait for the hub to answer.")
WATCH = typer.Option(
    None, "--watch", "-w", min=0.5, metavar="SECONDS",
    help="Ask again every SECONDS and redraw until Ctrl-C (exit 0); with --json, one "
         "document per line each time.")

# `-h` is `--help` everywhere: click passes these settings down to every subcommand.
HELP_OPTIONS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


def examples(*lines: str) -> str:
    """The `Examples:` section of a command's help (its epilog), one command per line.

    Rich markup is on for `hub`: examples hold no square brackets."""
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fleetledger")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def version_option(prog: str) -> Any:
    """A `--version` option for the root callback of `prog`: print, then exit 0."""
    def show_version(value: bool) -> None:
        if value:
            print(f"{prog} (fleetledger) {package_version()}")
            raise typer.Exit(0)

    return typer.Option(False, "--version", callback=show_version, is_eager=True,
                        help="Print the version and exit.")


def fail(message: str, code: int) -> typer.Exit:
    """Print one `error:` line; the caller raises the returned Exit. The message is
    escaped: it can carry names a device or an operator chose (`[red]` in a device id
    must print as itself, not as markup, and `[/x]` must not raise)."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


# What the `hub` extra adds to a device install (pyproject.toml): `hub serve`, `init`
# and `rebuild` need it, the operator commands do not.
HUB_EXTRA_MODULES = frozenset({"sqlalchemy", "sqlmodel", "psycopg", "prometheus_client", "jinja2",
                               "starlette", "uvicorn"})


class HubGroup(TyperGroup):
    """The root command group: every command runs inside its `invoke`, so a `HubError`
    from any of them is caught here, once, and becomes its exit code."""

    # `ctx` is typer's click Context; typer keeps that module private, hence Any.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except HubError as exc:
            raise fail(str(exc), exc.exit_code) from exc
        except ModuleNotFoundError as exc:
            # An agent-only install (`pip install fleetledger`) has the operator CLI but
            # not the hub's storage: say which extra to install, not a traceback.
            if (exc.name or "").partition(".")[0] not in HUB_EXTRA_MODULES:
                raise
            command = ctx.invoked_subcommand or "this command"
            raise fail(f"`hub {command}` runs the hub's storage and needs the `hub` extra "
                       f"({exc.name} is not installed): pip install 'fleetledger[hub]'",
                       EXIT_USAGE) from exc


def hub_config(home: Path, nats_url: str | None, *, server: bool = False) -> HubConfig:
    """The hub to talk to. Precedence: explicit flags (--nats, --key) > --home (or
    FLEET_HUB_HOME) > the current context (`hub context use`) > ./hub-home. `server`:
    the command runs the hub itself (`serve`, `rebuild`), so it needs a home."""
    if not _home_given and not server:
        from hub.home.contexts import Contexts, config_of

        contexts = Contexts.load()  # ContextError is a UsageError: exit 2
        context = contexts.current_context()
        if context is not None:
            return config_of(context, contexts.path, nats_url)
    return load_config(home, nats_url)  # HomeError is a UsageError: exit 2


def operator_key(config: HubConfig, key_path: Path | None) -> SigningKey:
    # A context's config names the operator's own key; a home's, its admin key.
    path = key_path or getattr(config, "own_key", None) or config.operator_key_path("admin")
    try:
        return SigningKey.load(path)
    except KeyFileError as exc:
        raise UsageError(f"{exc}; pass your operator key with --key") from exc


def run(config: HubConfig, key: Path | None, timeout: float,
        fn: Callable[[HubClient], Awaitable[T]]) -> T:
    """Connect as the operator whose key is `key`, run `fn` with the client, close."""
    signing_key = operator_key(config, key)

    async def go() -> T:
        # Commands are signed for the hub this home configures (its origin).
        async with await HubClient.connect(config.nats_url, signing_key, timeout,
                                           config.operator_auth(signing_key),
                                           audience=config.origin) as client:
            return await fn(client)

    return asyncio.run(go())


def watch(config: HubConfig, key: Path | None, timeout: float, every: float,
          fetch: Callable[[HubClient], Awaitable[T]], draw: Callable[[T], object],
          as_json: bool) -> None:
    """`--watch`: one connection, `fetch` every `every` seconds, each answer drawn as
    `show` would (a terminal is cleared first, so it shows the latest; --json prints one
    document per line). Ends on Ctrl-C or SIGTERM with exit 0; a hub that stops
    answering ends it like any command (exit 3)."""
    signing_key = operator_key(config, key)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with await HubClient.connect(config.nats_url, signing_key, timeout,
                                           config.operator_auth(signing_key),
                                           audience=config.origin) as client:
            while not stop.is_set():
                result = await fetch(client)
                if as_json:
                    draw(result)
                else:
                    out.clear()
                    out.print(f"[dim]every {every:g} s, Ctrl-C stops; "
                              f"{dt.datetime.now(dt.UTC):%H:%M:%S}Z[/dim]")
                    draw(result)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)

    asyncio.run(go())


def call(config: HubConfig, key: Path | None, timeout: float, verb: str,
         body: dict[str, Any] | None = None) -> Any:
    """One signed command; the hub's result."""
    return run(config, key, timeout, lambda c: c.call(verb, body or {}))


def print_json(value: Any) -> None:
    """Every `hub ... --json` document is printed here (through `show`), checked against
    its schema under FLEET_CHECK_JSON_SCHEMAS=1 (ledger/json_output.py)."""
    emit("hub", value, default=lambda v: v.hex() if isinstance(v, bytes) else str(v))


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


def rfc3339(ts_ns: int | None) -> str | None:
    """An RFC 3339 UTC time with microseconds (`2025-01-31T12:00:00.123456Z`) for
    --json output; None for "never" (0 or None)."""
    if not ts_ns:
        return None
    seconds, rest = divmod(int(ts_ns), 1_000_000_000)
    when = dt.datetime.fromtimestamp(seconds, dt.UTC).replace(microsecond=rest // 1000)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def ago(ts_ns: int | None) -> str:
    if not ts_ns:
        return "never"
    seconds = max(0.0, dt.datetime.now(dt.UTC).timestamp() - ts_ns / 1e9)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return utc_time(ts_ns)


def key_column(header: str, width: int = 0) -> Column:
    """A table column that is never wrapped, cut or dropped (ids people copy into the
    next command: seq, key ids, device ids), also on an 80-column terminal."""
    return Column(header, no_wrap=True, overflow="fold", min_width=max(width, len(header)))


def wait_for_port(url: str, seconds: float) -> bool:
    """Whether the TCP port of a NATS URL accepts connections within `seconds`."""
    import socket
    from urllib.parse import urlsplit

    first = url.split(",")[0]
    parts = urlsplit(first if "://" in first else f"nats://{first}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def resolve_ref(ref: str | None, model: str | None, version: str | None,
                ) -> tuple[str, str]:
    """NAME/VERSION from the argument, or from `--model NAME --version V` (the older
    spelling, kept), or from `--model NAME/VERSION`."""
    if ref is not None:
        if model is not None or version is not None:
            raise UsageError(f"give {ref} or --model/--version, not both")
        return model_ref(ref)
    if model is not None and "/" in model:
        if version is not None:
            raise UsageError(f"--model {model} already names a version; drop --version")
        return model_ref(model)
    if model is None or version is None:
        raise UsageError("which model version? give NAME/VERSION (e.g. kws/1), or "
                         "--model NAME --version VERSION")
    return model, version


def model_ref(ref: str) -> tuple[str, str]:
    """NAME/VERSION split in two."""
    name, sep, version = ref.partition("/")
    if not sep or not name or not version:
        raise UsageError(f"expected NAME/VERSION, got {ref!r}")
    return name, version
