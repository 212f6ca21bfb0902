"""Column types and encodings the hub's tables share across SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

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


def json_text(value: Any) -> str:
    """A JSON column's text: keys sorted, bytes as hex."""
    return json.dumps(value, sort_keys=True, default=lambda v: v.hex())


def row_dict(mapping: Any, json_columns: Iterable[str]) -> dict[str, Any]:
    """A row as a dict, with its JSON columns decoded."""
    out = dict(mapping)
    for column in json_columns:
        if isinstance(out.get(column), str):
            out[column] = json.loads(out[column])
    return out
