"""Column types the hub's tables share across SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer, Table


def int64_columns(*tables: Table) -> None:
    """Make every integer column 64-bit. Ledger seqs, nanosecond timestamps and counters
    outgrow PostgreSQL's 32-bit INTEGER (SQLite's INTEGER is 64-bit already); SQLModel
    maps `int` to INTEGER. Call it right after the tables are declared, before any
    statement on them is compiled (the PostgreSQL driver casts parameters to the type)."""
    for table in tables:
        for column in table.columns:
            if type(column.type) is Integer:
                column.type = BigInteger()
