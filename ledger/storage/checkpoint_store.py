"""Signed checkpoints and their witness cosignatures, stored beside the ledger.

Two append-only tables in the ledger's own database (SQLite or PostgreSQL, through the
`LedgerStore`'s engine):

* `ledger_checkpoints(size, ts, root, note)`: one row per tree size the log signed; the
  note is exactly the log-signed C2SP note (ledger/checkpoint.py), no cosignatures;
* `ledger_cosignatures(size, name, key_hash, signature, ts)`: one row per witness key
  that cosigned the checkpoint of that size (the first cosignature a witness sent is
  kept; later ones for the same size are ignored).

`StoredCheckpoint.full_note()` is the log's note with every stored cosignature line
appended, which is what the hub publishes and what proof bundles carry. UPDATE and
DELETE are refused by triggers, as for the entries: a checkpoint, once signed and
handed out, is evidence and never changes.

This module stores what it is given: checking signatures is the caller's job (the
hub signs the notes itself and checks cosignatures against its configured witness
keys before storing them, see hub/log/checkpointer.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Engine,
    LargeBinary,
    Table,
    Text,
    insert,
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Field, SQLModel

from ledger.errors import StoreError
from ledger.note import Signature, add_signatures
from ledger.storage.store import LedgerStore

CHECKPOINTS_APPEND_ONLY = "ledger checkpoints are append-only"


class LedgerCheckpointRow(SQLModel, table=True):
    __tablename__ = "ledger_checkpoints"

    size: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    ts: int = Field(sa_type=BigInteger)
    root: bytes = Field(sa_type=LargeBinary)
    note: bytes = Field(sa_type=LargeBinary)


class LedgerCosignatureRow(SQLModel, table=True):
    __tablename__ = "ledger_cosignatures"

    size: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    name: str = Field(primary_key=True, sa_type=Text)
    key_hash: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    signature: bytes = Field(sa_type=LargeBinary)
    ts: int = Field(sa_type=BigInteger)


CHECKPOINTS: Table = SQLModel.metadata.tables["ledger_checkpoints"]
COSIGNATURES: Table = SQLModel.metadata.tables["ledger_cosignatures"]
_TABLES = (CHECKPOINTS, COSIGNATURES)

_SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER IF NOT EXISTS {table.name}_no_{verb.lower()}
        BEFORE {verb} ON {table.name}
        BEGIN SELECT RAISE(ABORT, '{CHECKPOINTS_APPEND_ONLY}'); END"""
    for table in _TABLES
    for verb in ("UPDATE", "DELETE")
]
_POSTGRES_TRIGGERS = [
    f"""CREATE OR REPLACE FUNCTION ledger_checkpoints_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION '{CHECKPOINTS_APPEND_ONLY}'
              USING ERRCODE = 'integrity_constraint_violation'; END $$""",
] + [
    stmt
    for table in _TABLES
    for stmt in (
        f"""CREATE OR REPLACE TRIGGER {table.name}_no_change
            BEFORE UPDATE OR DELETE ON {table.name}
            FOR EACH ROW EXECUTE FUNCTION ledger_checkpoints_append_only()""",
        f"""CREATE OR REPLACE TRIGGER {table.name}_no_truncate
            BEFORE TRUNCATE ON {table.name}
            FOR EACH STATEMENT EXECUTE FUNCTION ledger_checkpoints_append_only()""",
    )
]


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint as stored: the log's note and the cosignatures added since."""

    size: int
    ts: int
    root: bytes
    note: bytes
    cosignatures: tuple[Signature, ...] = ()

    def full_note(self) -> bytes:
        """The log's note with every stored cosignature line appended."""
        if not self.cosignatures:
            return self.note
        return add_signatures(self.note, list(self.cosignatures))


class CheckpointStore:
    """The checkpoint tables of an open ledger. With `create=False` (an auditor reading
    a copy) missing tables read as "no checkpoints" and writing is refused."""

    def __init__(self, store: LedgerStore, *, create: bool = True) -> None:
        self._engine: Engine = store.engine
        self._where = store.location
        self._exists = True
        try:
            if create:
                self._create()
            else:
                self._exists = inspect(self._engine).has_table(CHECKPOINTS.name)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the checkpoints of {self._where}: {exc}") from exc

    def _create(self) -> None:
        with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Concurrent CREATE ... IF NOT EXISTS can collide in PostgreSQL.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7020776)")
            SQLModel.metadata.create_all(conn, tables=list(_TABLES))
            triggers = _POSTGRES_TRIGGERS if conn.dialect.name == "postgresql" else _SQLITE_TRIGGERS
            for stmt in triggers:
                conn.exec_driver_sql(stmt)

    # -- writing -------------------------------------------------------------------

    def add(self, size: int, root: bytes, note: bytes, ts: int | None = None) -> bool:
        """Store the log-signed checkpoint of `size`. Storing the same note again is a
        no-op (False); a different note for a stored size raises `StoreError` (the log
        would have signed two checkpoints of one size)."""
        self._writable()
        row = {"size": size, "ts": time.time_ns() if ts is None else ts,
               "root": bytes(root), "note": bytes(note)}
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(CHECKPOINTS), [row])
            return True
        except IntegrityError:
            pass
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot store a checkpoint in {self._where}: {exc}") from exc
        stored = self.get(size)
        if stored is not None and stored.note == bytes(note):
            return False
        raise StoreError(
            f"{self._where} already holds a different checkpoint of tree size {size}"
        )

    def add_cosignature(self, size: int, sig: Signature, ts: int | None = None) -> bool:
        """Store a witness's cosignature line for the checkpoint of `size` (already
        verified by the caller). False if that witness key already cosigned it."""
        self._writable()
        row = {"size": size, "name": sig.name, "key_hash": sig.key_hash,
               "signature": bytes(sig.signature), "ts": time.time_ns() if ts is None else ts}
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(COSIGNATURES), [row])
            return True
        except IntegrityError:
            return False
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot store a cosignature in {self._where}: {exc}") from exc

    def _writable(self) -> None:
        if not self._exists:
            raise StoreError(f"{self._where} was opened read-only for checkpoints")

    # -- reading -------------------------------------------------------------------

    def latest(self) -> StoredCheckpoint | None:
        """The checkpoint of the largest tree size, or None."""
        found = self._read(CHECKPOINTS.c.size == select(CHECKPOINTS.c.size)
                           .order_by(CHECKPOINTS.c.size.desc()).limit(1).scalar_subquery())
        return found[0] if found else None

    def get(self, size: int) -> StoredCheckpoint | None:
        found = self._read(CHECKPOINTS.c.size == size)
        return found[0] if found else None

    def all(self, max_size: int | None = None) -> list[StoredCheckpoint]:
        """Every stored checkpoint (of at most `max_size` entries), smallest first."""
        where = CHECKPOINTS.c.size >= 0 if max_size is None else CHECKPOINTS.c.size <= max_size
        return self._read(where)

    def _read(self, where: ColumnElement[bool]) -> list[StoredCheckpoint]:
        if not self._exists:
            return []
        cols = (CHECKPOINTS.c.size, CHECKPOINTS.c.ts, CHECKPOINTS.c.root, CHECKPOINTS.c.note)
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    select(*cols).where(where).order_by(CHECKPOINTS.c.size)
                ).all()
                if not rows:
                    return []
                cosigs = conn.execute(
                    select(COSIGNATURES)
                    .where(COSIGNATURES.c.size.in_(select(CHECKPOINTS.c.size).where(where)))
                    .order_by(COSIGNATURES.c.size, COSIGNATURES.c.ts, COSIGNATURES.c.name)
                ).all()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read the checkpoints of {self._where}: {exc}") from exc
        by_size: dict[int, list[Signature]] = {}
        for c in cosigs:
            by_size.setdefault(int(c.size), []).append(
                Signature(str(c.name), int(c.key_hash), bytes(c.signature))
            )
        return [
            StoredCheckpoint(int(r.size), int(r.ts), bytes(r.root), bytes(r.note),
                             tuple(by_size.get(int(r.size), ())))
            for r in rows
        ]
