"""Nonces of operator commands the ledger does not record, kept across hub restarts.

An accepted write leaves its nonce in the ledger (the `command` its event carries,
folded into `proj_nonces`). A read appends nothing, and neither does a write its
handler refused; their nonces are claimed here, in a table of the hub's database that
is not a fold of the ledger, so a command captured before a restart is still refused
after it. A nonce is claimed atomically (its primary key), so two copies of one command
sent at once cannot both pass. Rows whose command would be refused as stale anyway
(signed more than MAX_CLOCK_SKEW_NS ago) are swept: the table holds at most the
commands of one freshness window.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, Table, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel

from hub.columns import int64_columns


class SeenNonceRow(SQLModel, table=True):
    """A nonce of a read, or of a refused write, with the time its command was signed."""

    __tablename__ = "command_nonces"
    nonce: str = Field(primary_key=True)
    time: int = Field(index=True)


SEEN_NONCES: Table = SQLModel.metadata.tables[SeenNonceRow.__tablename__]
int64_columns(SEEN_NONCES)


def create_table(conn: Connection) -> None:
    SEEN_NONCES.create(conn, checkfirst=True)


class SeenNonces:
    """`nonce in seen`, `seen.claim(nonce, time)` and `seen.sweep(before)` on the table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __contains__(self, nonce: object) -> bool:
        if not isinstance(nonce, str):
            return False
        with self.engine.connect() as conn:
            return conn.execute(select(SEEN_NONCES.c.nonce)
                                .where(SEEN_NONCES.c.nonce == nonce)).first() is not None

    def claim(self, nonce: str, sent: int) -> bool:
        """Record `nonce`; False if it was recorded already (a replay)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(SEEN_NONCES).values(nonce=nonce, time=sent))
        except IntegrityError:
            return False
        return True

    def sweep(self, before: int) -> None:
        """Forget the nonces of commands signed before `before` (stale by then)."""
        with self.engine.begin() as conn:
            conn.execute(delete(SEEN_NONCES).where(SEEN_NONCES.c.time < before))

    def __len__(self) -> int:
        with self.engine.connect() as conn:
            return len(conn.execute(select(SEEN_NONCES.c.nonce)).all())
