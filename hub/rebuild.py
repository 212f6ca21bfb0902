"""State digest of the projections, and rebuilding them from the ledger.

The digest is BLAKE3 over the canonical encoding of every projection table's rows in
primary-key order, so two databases with the same state give the same digest whatever
their physical layout. `rebuild_digest` folds the whole ledger into empty in-memory
tables with the very function the hub uses live (hub.fold.apply_entries).
"""

from __future__ import annotations

from typing import Any

import blake3
from sqlalchemy import Connection, Engine, create_engine, select
from sqlalchemy.pool import StaticPool

from hub import fold as proj
from ledger.encoding import canonical_encode
from ledger.storage.store import LedgerStore

REBUILD_BATCH = 2000


def state_digest(conn: Connection) -> str:
    hasher = blake3.blake3(b"fleetledger/state/v1\x00")
    for table in proj.LEDGER_PROJECTIONS:
        hasher.update(canonical_encode(table.name))
        order = list(table.primary_key.columns)
        for row in conn.execute(select(table).order_by(*order)).mappings():
            hasher.update(canonical_encode({k: _plain(v) for k, v in row.items()}))
    return hasher.hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def replay(store: LedgerStore, engine: Engine) -> int:
    """Fold every ledger entry into the (empty) projection tables of `engine`."""
    with engine.begin() as conn:
        proj.create_tables(conn, include_telemetry=False)
        batch = []
        count = 0
        for entry in store.iter_entries():
            batch.append(entry)
            if len(batch) >= REBUILD_BATCH:
                proj.apply_entries(conn, batch)
                count += len(batch)
                batch.clear()
        proj.apply_entries(conn, batch)
        return count + len(batch)


def rebuild_digest(store: LedgerStore) -> tuple[str, int]:
    """Digest of the state rebuilt from scratch, and how many entries were replayed."""
    engine = create_engine("sqlite://", poolclass=StaticPool)
    try:
        count = replay(store, engine)
        with engine.connect() as conn:
            return state_digest(conn), count
    finally:
        engine.dispose()


def live_digest(store: LedgerStore) -> str:
    with store.engine.connect() as conn:
        return state_digest(conn)


def rebuild_in_place(store: LedgerStore) -> int:
    """Drop the projection tables of the live database and replay the ledger into them.
    Only with the hub stopped: it is the hub's state."""
    with store.engine.begin() as conn:
        for table in reversed(proj.LEDGER_PROJECTIONS):
            table.drop(conn, checkfirst=True)
    return replay(store, store.engine)
