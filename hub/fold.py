"""Hub state as a fold of ledger events (event sourcing): every capability's tables and
fold handlers, composed.

`apply_entries` is called by the ledger store inside the append transaction, so an
event and its effect on these tables commit together or not at all, and `hub rebuild`
replays the same function over the whole ledger into empty tables. Nothing else
writes the folded tables. Each capability's `state.py` holds its tables, their reads
and its `HANDLERS` (kind -> handler); an event may concern several (a `device.assigned`
moves the device and its rollout). Device telemetry counters are not lifecycle facts and
live in their own table (`device_telemetry`), fed by report intake.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, Table

from hub.commands import nonces
from hub.devices import state as device_state
from hub.governance import state as governance
from hub.rollouts import state as rollouts
from ledger.entry import Entry

# The tables `hub rebuild` must reproduce exactly from the ledger, in digest order.
LEDGER_PROJECTIONS: tuple[Table, ...] = (*governance.TABLES, *device_state.TABLES,
                                         *rollouts.TABLES)

# kind -> the handlers of every capability it concerns, in this order.
HANDLERS: dict[str, list[governance.Handler]] = {}
for _capability in (governance.HANDLERS, device_state.HANDLERS, rollouts.HANDLERS):
    for _kind, _handler in _capability.items():
        HANDLERS.setdefault(_kind, []).append(_handler)


def create_tables(conn: Connection, include_telemetry: bool = True) -> None:
    tables = LEDGER_PROJECTIONS + ((device_state.TELEMETRY,) if include_telemetry else ())
    for table in tables:
        table.create(conn, checkfirst=True)
    if include_telemetry:  # the hub's own tables, not folds of the ledger
        nonces.create_table(conn)


def apply_entries(conn: Connection, entries: Sequence[Entry]) -> None:
    for entry in entries:
        command = entry.payload.get("command")
        if isinstance(command, bytes):
            governance.record_nonce(conn, entry.seq, command)
        for handler in HANDLERS.get(entry.kind, ()):
            handler(conn, entry, entry.payload)
