"""The ledger's tables and the triggers that make them append-only (SQLite, PostgreSQL).

The tables are declared with SQLModel so the hub can keep its projection tables (same
metadata style) in the same database. Changing anything here changes the ledger format
(`FORMAT`, recorded in `ledger_meta`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Connection, Integer, LargeBinary, Table, Text, insert, select
from sqlmodel import Field, SQLModel

from ledger.entry import HASH_NAME
from ledger.merkle import DEFAULT_TREE_HASH
from ledger.tiles import TILE_WIDTH

__all__ = [
    "APPEND_ONLY_MESSAGE",
    "ENTRIES",
    "FORMAT",
    "META",
    "ROW_COLUMNS",
    "TILES",
    "TREE_APPEND_ONLY_MESSAGE",
    "LedgerEntryRow",
    "LedgerMetaRow",
    "LedgerTileRow",
    "create_schema",
]

# /2: the Merkle tree is stored as tiles (ledger_tiles), not one row per node.
FORMAT = "fleetledger-ledger/2"
APPEND_ONLY_MESSAGE = "ledger entries are append-only"
TREE_APPEND_ONLY_MESSAGE = "ledger Merkle tree tiles are append-only (they may only grow)"


class LedgerEntryRow(SQLModel, table=True):
    __tablename__ = "ledger_entries"

    # Not autoincrement: seq is chosen by the appender from the head it read under
    # the write lock (and PostgreSQL must not attach a sequence to it). 64-bit like ts;
    # SQLite keeps INTEGER, its rowid alias (BIGINT there would add a second index).
    seq: int = Field(
        primary_key=True,
        sa_type=BigInteger().with_variant(Integer(), "sqlite"),
        sa_column_kwargs={"autoincrement": False},
    )
    ts: int = Field(sa_type=BigInteger)
    kind: str = Field(sa_type=Text, index=True)
    actor: str = Field(sa_type=Text)
    subject: str = Field(sa_type=Text, index=True)
    body: bytes = Field(sa_type=LargeBinary)
    prev: bytes = Field(sa_type=LargeBinary)
    hash: bytes = Field(sa_type=LargeBinary)


class LedgerMetaRow(SQLModel, table=True):
    __tablename__ = "ledger_meta"

    key: str = Field(sa_type=Text, primary_key=True)
    value: str = Field(sa_type=Text)


class _Digest(LargeBinary):
    """A hash column: bytes go to the driver as they are. (LargeBinary's bind processor
    costs about as much as the insert itself on the append path; results are still
    converted to bytes.)"""

    cache_ok = True

    def bind_processor(self, dialect: Any) -> None:
        return None


class LedgerTileRow(SQLModel, table=True):
    """One tile of the Merkle tree (ledger/tiles.py): the hashes of the tree nodes
    (4 * level, 16 * idx + j), j = 0 .. width - 1, concatenated; width 1..16."""

    __tablename__ = "ledger_tiles"
    # SQLite: the primary key is the table (no rowid, no second index to maintain).
    __table_args__ = {"sqlite_with_rowid": False}

    level: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    idx: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    hashes: bytes = Field(sa_type=_Digest)


ENTRIES: Table = SQLModel.metadata.tables["ledger_entries"]
META: Table = SQLModel.metadata.tables["ledger_meta"]
TILES: Table = SQLModel.metadata.tables["ledger_tiles"]
ROW_COLUMNS = (
    ENTRIES.c.seq,
    ENTRIES.c.ts,
    ENTRIES.c.kind,
    ENTRIES.c.actor,
    ENTRIES.c.subject,
    ENTRIES.c.body,
    ENTRIES.c.prev,
    ENTRIES.c.hash,
)

# A tile row may only grow: its stored hashes stay as they are, new ones are appended
# (both tree hashes are 32 bytes, so a full tile is 512 bytes). Anything else is
# refused, like UPDATE and DELETE on entries.
_TILE_FULL_BYTES = TILE_WIDTH * 32
SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER IF NOT EXISTS ledger_entries_no_{verb.lower()}
        BEFORE {verb} ON ledger_entries
        BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END"""
    for verb in ("UPDATE", "DELETE")
] + [
    f"""CREATE TRIGGER IF NOT EXISTS ledger_tiles_no_delete
        BEFORE DELETE ON ledger_tiles
        BEGIN SELECT RAISE(ABORT, '{TREE_APPEND_ONLY_MESSAGE}'); END""",
    f"""CREATE TRIGGER IF NOT EXISTS ledger_tiles_only_grow
        BEFORE UPDATE ON ledger_tiles
        WHEN NEW.level IS NOT OLD.level OR NEW.idx IS NOT OLD.idx
          OR typeof(NEW.hashes) != 'blob'
          OR length(NEW.hashes) <= length(OLD.hashes)
          OR length(NEW.hashes) > {_TILE_FULL_BYTES}
          OR substr(NEW.hashes, 1, length(OLD.hashes)) IS NOT OLD.hashes
        BEGIN SELECT RAISE(ABORT, '{TREE_APPEND_ONLY_MESSAGE}'); END""",
]
POSTGRES_TRIGGERS = [
    # SQLSTATE class 23, like SQLite's RAISE(ABORT): an IntegrityError on both backends.
    f"""CREATE OR REPLACE FUNCTION ledger_entries_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}'
              USING ERRCODE = 'integrity_constraint_violation'; END $$""",
    """CREATE OR REPLACE TRIGGER ledger_entries_no_change
        BEFORE UPDATE OR DELETE ON ledger_entries
        FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()""",
    """CREATE OR REPLACE TRIGGER ledger_entries_no_truncate
        BEFORE TRUNCATE ON ledger_entries
        FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only()""",
    f"""CREATE OR REPLACE FUNCTION ledger_tiles_only_grow() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'UPDATE' AND NEW.level = OLD.level AND NEW.idx = OLD.idx
               AND length(NEW.hashes) > length(OLD.hashes)
               AND length(NEW.hashes) <= {_TILE_FULL_BYTES}
               AND substring(NEW.hashes from 1 for length(OLD.hashes)) = OLD.hashes THEN
                RETURN NEW;
            END IF;
            RAISE EXCEPTION '{TREE_APPEND_ONLY_MESSAGE}'
                USING ERRCODE = 'integrity_constraint_violation';
        END $$""",
    """CREATE OR REPLACE TRIGGER ledger_tiles_no_change
        BEFORE UPDATE OR DELETE ON ledger_tiles
        FOR EACH ROW EXECUTE FUNCTION ledger_tiles_only_grow()""",
    """CREATE OR REPLACE TRIGGER ledger_tiles_no_truncate
        BEFORE TRUNCATE ON ledger_tiles
        FOR EACH STATEMENT EXECUTE FUNCTION ledger_tiles_only_grow()""",
]


def create_schema(conn: Connection, tree_hash: str | None = None) -> None:
    """Create the tables, triggers and meta rows that are missing (idempotent). A new
    ledger records its Merkle tree hash now, once (default sha256)."""
    SQLModel.metadata.create_all(conn, tables=[ENTRIES, META, TILES])
    dialect = conn.dialect.name
    triggers = SQLITE_TRIGGERS if dialect == "sqlite" else POSTGRES_TRIGGERS
    if dialect in ("sqlite", "postgresql"):
        for ddl in triggers:
            conn.exec_driver_sql(ddl)
    present = set(conn.execute(select(META.c.key)).scalars())
    wanted = {"format": FORMAT, "hash": HASH_NAME}
    if "format" not in present:  # a new ledger: its tree hash is chosen now, once
        wanted["merkle_hash"] = tree_hash or DEFAULT_TREE_HASH
    rows = [{"key": k, "value": v} for k, v in wanted.items() if k not in present]
    if rows:
        conn.execute(insert(META), rows)
