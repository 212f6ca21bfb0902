"""Governance state: operators, the nonces of accepted commands, and model releases.

The tables are a fold of ledger events (HANDLERS; hub.fold composes every capability's),
written only inside the append transaction and by `hub rebuild`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Table, insert, select, update
from sqlmodel import Field, SQLModel

from edge_agent.protocol import ProtocolError, SignedEnvelope
from hub import events as ev
from hub.columns import int64_columns, json_text, row_dict
from hub.commands.outcome import CommandError
from hub.governance import rules as lc
from hub.governance.rebase import rebased_validation
from ledger.encoding import canonical_decode
from ledger.entry import Entry


class OperatorRow(SQLModel, table=True):
    __tablename__ = "proj_operators"
    keyid: str = Field(primary_key=True)
    name: str = Field(index=True)
    public: bytes
    roles: str  # JSON list
    revoked: bool = False
    added_seq: int


class NonceRow(SQLModel, table=True):
    """Nonces of accepted operator commands: a replay is refused."""

    __tablename__ = "proj_nonces"
    nonce: str = Field(primary_key=True)
    seq: int


class ReleaseRow(SQLModel, table=True):
    __tablename__ = "proj_releases"
    name: str = Field(primary_key=True)
    version: str = Field(primary_key=True)
    digest: str
    size: int
    state: str
    registrant: str  # actor (key id) who registered it
    inputs: str = "[]"  # JSON
    outputs: str = "[]"  # JSON
    lineage: str = "{}"  # JSON
    card: str = "{}"  # JSON
    validation: str = "{}"  # JSON: the last validation payload without the command
    approvals: str = "[]"  # JSON list of approver key ids
    approvals_required: int = 1
    manifest_hash: str = ""
    reason: str = ""
    registered_seq: int
    registered_ts: int
    updated_seq: int = 0


OPERATORS: Table = SQLModel.metadata.tables[OperatorRow.__tablename__]
NONCES: Table = SQLModel.metadata.tables[NonceRow.__tablename__]
RELEASES: Table = SQLModel.metadata.tables[ReleaseRow.__tablename__]
int64_columns(OPERATORS, NONCES, RELEASES)

TABLES: tuple[Table, ...] = (OPERATORS, NONCES, RELEASES)
_JSON_COLUMNS = ("inputs", "outputs", "lineage", "card", "validation", "approvals", "roles")


# ---------------------------------------------------------------- fold


def record_nonce(conn: Connection, seq: int, envelope: bytes) -> None:
    """The nonce of an accepted operator command (the signed `command` an event carries):
    the same command is refused if it comes again."""
    try:
        doc = canonical_decode(SignedEnvelope.decode(envelope).signed)
    except (ProtocolError, ValueError):
        return
    nonce = doc.get("nonce") if isinstance(doc, dict) else None
    if isinstance(nonce, str) and conn.execute(
        select(NONCES.c.nonce).where(NONCES.c.nonce == nonce)
    ).first() is None:
        conn.execute(insert(NONCES).values(nonce=nonce, seq=seq))


def _operator_added(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(insert(OPERATORS).values(
        keyid=p["keyid"], name=p["name"], public=p["public"], roles=json_text(sorted(p["roles"])),
        revoked=False, added_seq=entry.seq,
    ))


def _operator_revoked(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(update(OPERATORS).where(OPERATORS.c.keyid == p["keyid"]).values(revoked=True))


# ---------------------------------------------------------------- models


def _release_update(conn: Connection, entry: Entry, p: dict[str, Any], **values: Any) -> None:
    conn.execute(
        update(RELEASES)
        .where(RELEASES.c.name == p["name"], RELEASES.c.version == p["version"])
        .values(updated_seq=entry.seq, **values)
    )


def _registered(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(insert(RELEASES).values(
        name=p["name"], version=p["version"], digest=p["digest"], size=p["size"],
        state=lc.REGISTERED, registrant=entry.actor, inputs=json_text(p.get("inputs", [])),
        outputs=json_text(p.get("outputs", [])), lineage=json_text(p.get("lineage", {})),
        card=json_text(p.get("card", {})), registered_seq=entry.seq, registered_ts=entry.ts,
        updated_seq=entry.seq,
    ))


def _validated(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    report = {k: v for k, v in p.items() if k not in ("command", "name", "version")}
    _release_update(
        conn, entry, p,
        state=lc.VALIDATED if p["passed"] else lc.VALIDATION_FAILED,
        validation=json_text(report), approvals="[]",
        approvals_required=int(p.get("approvals_required", 1)),
    )


def _reference_rebased(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    row = get_release(conn, p["name"], p["version"])
    if row is None:
        return
    _release_update(conn, entry, p,
                    validation=json_text(rebased_validation(row["validation"], p)))


def _approved(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    row = get_release(conn, p["name"], p["version"])
    if row is None:
        return
    approvals = [*row["approvals"], entry.actor]
    state = lc.APPROVED if len(approvals) >= row["approvals_required"] else row["state"]
    _release_update(conn, entry, p, approvals=json_text(approvals), state=state)


def _state_change(state: str) -> Any:
    def handler(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
        values: dict[str, Any] = {"state": state}
        if "reason" in p:
            values["reason"] = p["reason"]
        if "manifest_hash" in p:
            values["manifest_hash"] = p["manifest_hash"]
        _release_update(conn, entry, p, **values)

    return handler


Handler = Callable[[Connection, Entry, dict[str, Any]], None]
HANDLERS: dict[str, Handler] = {
    ev.OPERATOR_ADDED: _operator_added,
    ev.OPERATOR_REVOKED: _operator_revoked,
    ev.MODEL_REGISTERED: _registered,
    ev.MODEL_VALIDATED: _validated,
    ev.MODEL_APPROVED: _approved,
    ev.MODEL_REJECTED: _state_change(lc.REJECTED),
    ev.MODEL_RELEASED: _state_change(lc.RELEASED),
    ev.MODEL_DEPRECATED: _state_change(lc.DEPRECATED),
    ev.MODEL_REVOKED: _state_change(lc.REVOKED),
    ev.MODEL_REFERENCE_REBASED: _reference_rebased,
    ev.MODEL_RESIGNED: lambda conn, entry, p: _release_update(
        conn, entry, p, manifest_hash=p["manifest_hash"]),
}


# ---------------------------------------------------------------- reads


def get_release(conn: Connection, name: str, version: str) -> dict[str, Any] | None:
    query = select(RELEASES).where(RELEASES.c.name == name, RELEASES.c.version == version)
    row = conn.execute(query).mappings().first()
    return row_dict(row, _JSON_COLUMNS) if row is not None else None


def list_releases(conn: Connection, name: str | None = None) -> list[dict[str, Any]]:
    query = select(RELEASES).order_by(RELEASES.c.name, RELEASES.c.registered_seq)
    if name is not None:
        query = query.where(RELEASES.c.name == name)
    return [row_dict(r, _JSON_COLUMNS) for r in conn.execute(query).mappings()]


def list_operators(conn: Connection) -> list[dict[str, Any]]:
    query = select(OPERATORS).order_by(OPERATORS.c.added_seq)
    return [row_dict(r, _JSON_COLUMNS) for r in conn.execute(query).mappings()]


def nonce_used(conn: Connection, nonce: str) -> bool:
    return conn.execute(select(NONCES.c.nonce).where(NONCES.c.nonce == nonce)).first() is not None


def require_release(conn: Connection, name: str, version: str) -> dict[str, Any]:
    """The release row of `name`/`version`, or the refusal an operator can act on."""
    row = get_release(conn, name, version)
    if row is None:
        raise CommandError(f"model {name}/{version} is not registered; see `hub model list`")
    return row


def require_transition(action: str, row: dict[str, Any]) -> None:
    """Refuse (TransitionRefused) unless the lifecycle allows `action` on release `row`."""
    lc.check_transition(action, row["state"], row["name"], row["version"])
