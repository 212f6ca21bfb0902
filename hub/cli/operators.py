"""`hub operator add|revoke|list`: the people who sign commands, and their roles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from hub.cli._common import (
    HOME,
    JSON,
    KEY,
    NATS_URL,
    TIMEOUT,
    call,
    examples,
    hub_config,
    key_column,
    out,
    show,
)
from hub.commands.envelope import ROLES
from hub.errors import UsageError
from ledger.signing import SigningKey

operator_app = typer.Typer(
    help="Operators (people) and their roles.", no_args_is_help=True,
    epilog=examples(
    'hub operator add alice --role approver --home hub-home',
    'hub operator list --home hub-home',
),
)


@operator_app.command("add", epilog=examples(
    'hub operator add alice --role approver --home hub-home',
    'hub operator add bob --role operator --role registrant --pubkey HEX --home hub-home',
    'hub model approve kws/1 --key hub-home/operators/alice.key --home hub-home    (alice signs)',
))
def operator_add(
    name: str = typer.Argument(..., help="The person's name, e.g. alice."),
    role: list[str] = typer.Option(..., "--role", help=f"Repeatable: {', '.join(ROLES)}."),
    pubkey: str | None = typer.Option(
        None, "--pubkey", help="Their Ed25519 public key (hex); else a new key is made."
    ),
    key_out: Path | None = typer.Option(
        None, "--out", help="Where to write the new key (default HOME/operators/NAME.key)."
    ),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Add an operator with roles (needs the admin role). Without --pubkey a key file is
    created for them; hand it over privately and have them use it with --key."""
    config = hub_config(home, nats_url)
    bad = [r for r in role if r not in ROLES]
    if bad:
        raise UsageError(f"unknown role(s) {', '.join(bad)}; use {', '.join(ROLES)}")
    new_path = None
    if pubkey is not None:
        try:
            public = bytes.fromhex(pubkey)
        except ValueError as exc:
            raise UsageError("--pubkey must be 64 hex characters") from exc
    else:
        new_path = key_out or config.operator_key_path(name)
        if new_path.exists():
            raise UsageError(f"{new_path} exists; pass --pubkey or another --out")
        new_key = SigningKey.generate()
        public = new_key.public.raw
    result = call(config, key, timeout, "operator.add",
                  {"name": name, "public": public, "roles": role})
    if new_path is not None:
        new_key.save(new_path)
        result["key_file"] = str(new_path)

    def render(result: dict[str, Any]) -> None:
        out.print(f"added operator {name} (key {result['keyid']}) with roles "
                  f"{', '.join(result['roles'])}")
        if new_path is not None:
            out.print(f"  their key: {new_path} (give it to them; it signs their commands)")

    show(result, as_json, render)


@operator_app.command("revoke", epilog=examples(
    "hub operator revoke alice --reason 'left the team' --home hub-home",
))
def operator_revoke(
    name: str = typer.Argument(..., help="Operator to revoke."),
    reason: str = typer.Option("", "--reason", help="Why, for the record."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    timeout: float = TIMEOUT,
) -> None:
    """Revoke an operator's key (needs admin). Their later commands are refused."""
    result = call(hub_config(home, nats_url), key, timeout, "operator.revoke",
                  {"name": name, "reason": reason})
    out.print(f"revoked {name} (key {result['keyid']})")


@operator_app.command("list", epilog=examples(
    'hub operator list --home hub-home',
    'hub operator list --json --home hub-home',
))
def operator_list(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
                  as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """List operators, their key ids and roles."""
    def render(rows: list[dict[str, Any]]) -> None:
        table = Table("name", key_column("key id", 32), "roles", "status")
        for r in rows:
            table.add_row(r["name"], r["keyid"], ", ".join(r["roles"]),
                          "[red]revoked[/red]" if r["revoked"] else "active")
        out.print(table)

    show(call(hub_config(home, nats_url), key, timeout, "operators"), as_json, render)
