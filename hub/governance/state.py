"""Governance state: operators, command nonces and model releases (hub.fold tables)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from hub import fold
from hub.commands.outcome import CommandError
from hub.governance import rules as lc


def require_release(conn: Connection, name: str, version: str) -> dict[str, Any]:
    """The release row of `name`/`version`, or the refusal an operator can act on."""
    row = fold.get_release(conn, name, version)
    if row is None:
        raise CommandError(f"model {name}/{version} is not registered; see `hub model list`")
    return row


def require_transition(action: str, row: dict[str, Any]) -> None:
    """Refuse (TransitionRefused) unless the lifecycle allows `action` on release `row`."""
    lc.check_transition(action, row["state"], row["name"], row["version"])
