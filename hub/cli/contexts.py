"""`hub context`: operator profiles, so an operator works from their own machine with
only their own key (the file format is hub/home/contexts.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from hub.cli._common import JSON, examples, key_column, out, show
from hub.errors import UsageError
from hub.home.config import load_config
from hub.home.contexts import Context, ContextError, Contexts, check_name
from hub.home.nats_config import ca_path, load_credentials
from ledger.errors import KeyFileError
from ledger.signing import SigningKey

context_app = typer.Typer(
    help="Operator profiles (like kubeconfig contexts): the hub's NATS URL, its CA, its "
    "origin and your own key, kept in $XDG_CONFIG_HOME/fleetledger/contexts.toml (0600; "
    "env FLEET_CONTEXTS), no hub secret. With a current context every operator command "
    "works without --home. Precedence: --nats/--key > --home (or FLEET_HUB_HOME) > the "
    "current context > ./hub-home.",
    no_args_is_help=True,
    epilog=examples(
        "hub context add prod --from-home hub-home --key ana.key",
        "hub context add prod --nats tls://hub.example:4222 --ca ca.pem --key ana.key "
        "--audience https://hub.example/fleet",
        "hub context use prod",
        "hub context list --json",
    ))


def _row(c: Context, current: str | None) -> dict[str, Any]:
    return {"name": c.name, "current": c.name == current, "nats": c.nats, "ca": c.ca,
            "key": c.key, "keyid": _keyid(c.key), "audience": c.audience, "auth": c.auth}


def _keyid(path: str) -> str | None:
    try:
        return SigningKey.load(Path(path)).keyid
    except KeyFileError:
        return None


@context_app.command("add", epilog=examples(
    "hub context add prod --from-home hub-home --key ana.key",
    "hub context add prod --nats tls://hub.example:4222 --ca ca.pem --key ana.key "
    "--audience https://hub.example/fleet",
))
def context_add(
    name: str = typer.Argument(..., help="The context's name."),
    nats: str | None = typer.Option(None, "--nats", help="The hub's NATS URL (default with "
                                    "--from-home: the home's)."),
    ca: Path | None = typer.Option(None, "--ca", help="CA certificate (PEM) of the NATS "
                                   "server's TLS certificate (default with --from-home: "
                                   "the home's, if it runs TLS)."),
    key: Path = typer.Option(..., "--key", help="Your own operator key file."),
    audience: str | None = typer.Option(None, "--audience", help="The hub's origin (its "
                                        "config.toml `origin`): what commands are signed "
                                        "for."),
    from_home: Path | None = typer.Option(None, "--from-home", metavar="DIR", help="Read "
                                          "the NATS URL, origin, CA and auth mode from a "
                                          "hub home; nothing secret is copied."),
    use: bool = typer.Option(True, "--use/--no-use", help="Make it the current context."),
) -> None:
    """Add (or replace) a context and make it the current one."""
    contexts = Contexts.load()
    check_name(name)
    auth = "nkey"
    if from_home is not None:
        if audience is not None:
            raise UsageError("give --audience or --from-home, not both")
        config = load_config(from_home)
        audience, nats = config.origin, nats or config.nats_url
        ca = ca or ca_path(from_home)
        auth = "nkey" if load_credentials(from_home) else "none"
    if audience is None or nats is None:
        raise UsageError("a context needs --nats and --audience (or --from-home HOME)")
    try:
        SigningKey.load(key)
    except KeyFileError as exc:
        raise ContextError(f"--key: {exc}") from exc
    if ca is not None and not ca.is_file():
        raise ContextError(f"--ca {ca}: no such file")
    contexts.contexts[name] = Context(name, nats, str(key.resolve()), audience,
                                      str(ca.resolve()) if ca is not None else None, auth)
    if use or contexts.current is None:
        contexts.current = name
    contexts.save()
    out.print(f"context {name} saved in {contexts.path}"
              + (" (current)" if contexts.current == name else ""))


@context_app.command("use", epilog=examples("hub context use prod"))
def context_use(name: str = typer.Argument(..., help="The context to use.")) -> None:
    """Make a context the current one."""
    contexts = Contexts.load()
    contexts.get(name)
    contexts.current = name
    contexts.save()
    out.print(f"current context: {name}")


@context_app.command("list", epilog=examples("hub context list", "hub context list --json"))
def context_list(as_json: bool = JSON) -> None:
    """Every context; the current one is marked."""
    contexts = Contexts.load()
    rows = [_row(c, contexts.current) for c in sorted(contexts.contexts.values(),
                                                      key=lambda c: c.name)]

    def render(rows: list[dict[str, Any]]) -> None:
        table = Table(" ", key_column("name"), "nats", "audience", key_column("keyid"),
                      title=str(contexts.path))
        for r in rows:
            table.add_row("*" if r["current"] else "", r["name"], r["nats"], r["audience"],
                          r["keyid"] or "(key unreadable)")
        out.print(table)

    show(rows, as_json, render)


@context_app.command("show", epilog=examples("hub context show", "hub context show prod --json"))
def context_show(
    name: str | None = typer.Argument(None, help="A context (default: the current one)."),
    as_json: bool = JSON,
) -> None:
    """One context's settings."""
    contexts = Contexts.load()
    if name is None:
        found = contexts.current_context()
        if found is None:
            raise ContextError(f"no current context in {contexts.path}; add one with "
                               "`hub context add` or choose one with `hub context use`")
    else:
        found = contexts.get(name)

    def render(row: dict[str, Any]) -> None:
        for k, v in row.items():
            out.print(f"{k:<9} {v if v is not None else '-'}", highlight=False)

    show(_row(found, contexts.current), as_json, render)


@context_app.command("remove", epilog=examples("hub context remove prod"))
def context_remove(name: str = typer.Argument(..., help="The context to remove.")) -> None:
    """Remove a context (its key file is left alone)."""
    contexts = Contexts.load()
    contexts.get(name)
    del contexts.contexts[name]
    if contexts.current == name:
        contexts.current = None
    contexts.save()
    out.print(f"context {name} removed")
