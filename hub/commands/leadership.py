"""Several `hub serve` processes on one PostgreSQL: one leader, fenced appends, and one
writer at a time across processes (docs/ARCHITECTURE.md "Several hub processes").

The lease is a row in the database the ledger lives in (`hub_leader`, one row): the
leader's epoch, who holds it, and until when, in the database's own clock (so hosts
with different clocks agree on expiry). A process takes the lease when it has expired by
bumping the epoch; the leader renews it every third of its length. A leader that is
killed, loses its database session, or is paused past its lease (SIGSTOP) stops
renewing, and a standby takes over once the lease has run out.

Why a row and not a session-level advisory lock: a paused process keeps its TCP session
(its kernel still answers), so PostgreSQL would keep its lock for ever and nobody could
take over; a lease with an expiry in the database's clock runs out whatever the holder
does. Why not a NATS KV key with a TTL: the fence below must be read in the same
transaction as the append, so the epoch has to live in the database anyway; one system
deciding both leadership and fencing leaves no window between them.

Fencing: every append made by leader-only work carries the epoch the process leads
with, and `fence` reads the `hub_leader` row `FOR SHARE` inside the append's
transaction, after the chain-head lock. A newer epoch refuses the append (`Fenced`) and
the whole transaction rolls back. The new leader's epoch bump (an UPDATE of that row)
waits for any fenced append still in flight, so once a leader holds its epoch, no
append of an older epoch can commit after it: the ledger can never carry a decision
of a deposed leader made after the takeover.

`WriteLock`: the hub judges state and then appends (hub.commands.writer); with several
processes the judgement must not interleave with another process's append, so the
writer's lock is also a PostgreSQL advisory lock taken in a transaction on a dedicated
connection. That connection has `idle_in_transaction_session_timeout` set: a process
paused while holding it loses its session after that long, and the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    event,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from hub.errors import UsageError
from ledger.errors import StoreError

log = logging.getLogger("hub.leadership")

DEFAULT_LEASE_S = 10.0
# The advisory lock key of the cross-process writer lock ("fleetw").
WRITE_LOCK_KEY = 0x666C65657477
LEADER = "leader"
STANDBY = "standby"

_metadata = MetaData()
LEADER_TABLE = Table(
    "hub_leader", _metadata,
    Column("id", Integer, primary_key=True),  # always 1: one lease per ledger
    Column("epoch", BigInteger, nullable=False),
    Column("holder", String, nullable=False),  # host:pid:random of the holding process
    Column("host", String, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("expires", Float(precision=53), nullable=False),  # database clock, s
    Column("since", Float(precision=53), nullable=False),  # when this epoch began
    # The ledger's head seq when this epoch began (-1: empty): no append of an older
    # epoch can have a higher seq (the bump waited for any fenced append in flight).
    Column("since_seq", BigInteger, nullable=False, default=-1),
)
PROCESSES_TABLE = Table(
    "hub_processes", _metadata,
    Column("holder", String, primary_key=True),
    Column("host", String, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("role", String, nullable=False),
    Column("epoch", BigInteger, nullable=False),  # the epoch it leads with, else -1
    Column("seen", Float(precision=53), nullable=False),  # database clock, s
    Column("last_leader_seq", BigInteger, nullable=False),  # its last leader append, or -1
    Column("fenced", BigInteger, nullable=False),  # its leader appends refused
)


class AlreadyServing(UsageError):
    """A second `hub serve` on a SQLite ledger."""


class Fenced(StoreError):
    """A leader-only append refused: this process does not lead (any more). A
    `StoreError`: what it refused is not stored, and report intake leaves such a batch
    unacknowledged, for the leader to take."""


def db_now(conn: Connection) -> float:
    """The database's clock, in seconds (the one clock every hub process agrees on)."""
    if conn.dialect.name == "postgresql":
        return float(conn.execute(text("SELECT extract(epoch FROM clock_timestamp())"))
                     .scalar_one())
    return time.time()


def fence(conn: Connection, epoch: int) -> None:
    """Raise `Fenced` unless `epoch` is the newest leader's. Run inside the append's
    transaction: `FOR SHARE` makes a new leader's epoch bump wait for this transaction."""
    stmt = select(LEADER_TABLE.c.epoch, LEADER_TABLE.c.holder).where(LEADER_TABLE.c.id == 1)
    row = conn.execute(stmt.with_for_update(read=True)).first()
    if row is None or int(row.epoch) != epoch:
        newer = "none" if row is None else f"{row.epoch} ({row.holder})"
        raise Fenced(f"not the leader: this process leads with epoch {epoch}, the ledger's "
                     f"leader is epoch {newer}")


@dataclass(frozen=True)
class LeaderInfo:
    epoch: int
    holder: str
    host: str
    pid: int
    expires_in_s: float  # negative: expired (nobody leads until a process takes it)
    since_seq: int  # the ledger's head when this epoch began (-1: empty)

    def to_map(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "holder": self.holder, "host": self.host,
                "pid": self.pid, "expires_in_s": round(self.expires_in_s, 3),
                "since_seq": self.since_seq}


def process_id() -> tuple[str, str, int]:
    """(holder, host, pid) of this process; the random part tells apart a restarted
    process that got the same pid."""
    host, pid = socket.gethostname(), os.getpid()
    return f"{host}:{pid}:{secrets.token_hex(4)}", host, pid


class Lease:
    """The lease row, read and written in short transactions (blocking; run them off
    the event loop)."""

    def __init__(self, engine: Engine, lease_s: float = DEFAULT_LEASE_S,
                 holder: tuple[str, str, int] | None = None) -> None:
        if lease_s <= 0:
            raise ValueError("the leader lease must be longer than 0 s")
        self.engine = engine
        self.lease_s = lease_s
        self.holder, self.host, self.pid = holder or process_id()
        create_tables(engine)

    def acquire(self) -> int | None:
        """Take the lease if nobody holds it (expired); the new epoch, else None."""
        with self.engine.begin() as conn:
            row = conn.execute(select(LEADER_TABLE).where(LEADER_TABLE.c.id == 1)
                               .with_for_update()).first()
            now = db_now(conn)
            if row is None or float(row.expires) > now:
                return None
            epoch = int(row.epoch) + 1
            # After the row lock: an append of the old epoch that was in flight has
            # committed by now, and this read sees it.
            head = conn.execute(text("SELECT max(seq) FROM ledger_entries")).scalar()
            conn.execute(LEADER_TABLE.update().where(LEADER_TABLE.c.id == 1).values(
                epoch=epoch, holder=self.holder, host=self.host, pid=self.pid,
                expires=now + self.lease_s, since=now,
                since_seq=-1 if head is None else int(head)))
        return epoch

    def renew(self, epoch: int) -> bool:
        """Extend the lease of `epoch`; False if a newer leader holds it."""
        with self.engine.begin() as conn:
            now = db_now(conn)
            done = conn.execute(LEADER_TABLE.update().where(
                LEADER_TABLE.c.id == 1, LEADER_TABLE.c.epoch == epoch,
                LEADER_TABLE.c.holder == self.holder).values(expires=now + self.lease_s))
            return done.rowcount == 1

    def release(self, epoch: int) -> None:
        """End the lease of `epoch` now (a clean stop): a standby need not wait it out."""
        with self.engine.begin() as conn:
            conn.execute(LEADER_TABLE.update().where(
                LEADER_TABLE.c.id == 1, LEADER_TABLE.c.epoch == epoch,
                LEADER_TABLE.c.holder == self.holder).values(expires=0.0))

    def leader(self) -> LeaderInfo | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(LEADER_TABLE).where(LEADER_TABLE.c.id == 1)).first()
            now = db_now(conn)
        if row is None or not row.holder:
            return None
        return LeaderInfo(int(row.epoch), str(row.holder), str(row.host), int(row.pid),
                          float(row.expires) - now, int(row.since_seq))

    def heartbeat(self, role: str, epoch: int | None, last_leader_seq: int = -1,
                  fenced: int = 0) -> None:
        """Record this process and its role (what `hub status` lists)."""
        with self.engine.begin() as conn:
            values = {"host": self.host, "pid": self.pid, "role": role,
                      "epoch": -1 if epoch is None else epoch, "seen": db_now(conn),
                      "last_leader_seq": last_leader_seq, "fenced": fenced}
            done = conn.execute(PROCESSES_TABLE.update().where(
                PROCESSES_TABLE.c.holder == self.holder).values(**values))
            if done.rowcount == 0:
                conn.execute(PROCESSES_TABLE.insert().values(holder=self.holder, **values))

    def forget(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(PROCESSES_TABLE.delete().where(PROCESSES_TABLE.c.holder == self.holder))

    def processes(self) -> list[dict[str, Any]]:
        """The processes seen within three leases, with how long ago; one that says it
        leads with an epoch older than the lease's is "deposed" (killed, or paused)."""
        with self.engine.connect() as conn:
            now = db_now(conn)
            current = conn.execute(select(LEADER_TABLE.c.epoch)).scalar()
            rows = conn.execute(select(PROCESSES_TABLE).where(
                PROCESSES_TABLE.c.seen > now - 3 * self.lease_s)
                .order_by(PROCESSES_TABLE.c.holder)).all()
        return [{"holder": r.holder, "host": r.host, "pid": r.pid,
                 "role": "deposed" if r.role == LEADER and r.epoch != current else r.role,
                 "epoch": None if r.epoch < 0 else r.epoch,
                 "seen_s_ago": round(max(0.0, now - r.seen), 3),
                 "last_leader_seq": None if r.last_leader_seq < 0 else r.last_leader_seq,
                 "fenced": r.fenced} for r in rows]


def create_tables(engine: Engine) -> None:
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # concurrent CREATE TABLE can collide
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WRITE_LOCK_KEY})
            _metadata.create_all(conn, checkfirst=True)
            if conn.execute(select(LEADER_TABLE.c.id)).first() is None:
                conn.execute(LEADER_TABLE.insert().values(
                    id=1, epoch=0, holder="", host="", pid=0, expires=0.0, since=0.0,
                    since_seq=-1))
    except IntegrityError:
        pass  # another process made the row meanwhile


class Leadership:
    """Who leads, for this process: runs the lease (`run`), calls `on_lead(epoch)` when
    it becomes the leader and `on_follow()` when it stops being one, and guards
    leader-only appends (`check`, `fence_in`, `refused`).

    Without a lease (SQLite: one process per ledger) the process leads from `run` on,
    with epoch 0, and nothing is checked in the database."""

    def __init__(self, lease: Lease | None,
                 on_lead: Callable[[int], Awaitable[None]],
                 on_follow: Callable[[], Awaitable[None]],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.lease = lease
        self.on_lead = on_lead
        self.on_follow = on_follow
        self.monotonic = monotonic
        self.epoch: int | None = None if lease is not None else 0
        self._announced: int | None = None  # the epoch `on_lead` was called for
        # Called each round while standing by (the hub refreshes what its reads show).
        self.on_standby: Callable[[], Awaitable[None]] | None = None
        self.valid_until = 0.0  # monotonic: our own lease surely lasts until then
        self.fenced = 0  # leader-only appends refused
        self.last_leader_seq = -1  # the seq of this process's last leader append
        self.takeovers = 0
        self._wake = asyncio.Event()
        self._fenced_logged: int | None = None  # the epoch whose refusal was logged

    @property
    def role(self) -> str:
        return LEADER if self.epoch is not None else STANDBY

    def leads(self) -> bool:
        """Whether this process leads and its lease has surely not run out (its own
        clock; the database's fence is the guarantee, this only saves the round trip)."""
        if self.lease is None:
            return True
        return self.epoch is not None and self.monotonic() < self.valid_until

    def check(self) -> int:
        """The epoch to append leader-only work with; `Fenced` if this process does not
        lead now."""
        if self.lease is None:
            return 0
        epoch = self.epoch
        if epoch is None or not self.leads():
            raise self.refused(Fenced(
                "not the leader" if epoch is None else
                f"the lease of epoch {epoch} ran out before it was renewed"))
        return epoch

    def fence_in(self, conn: Connection, epoch: int) -> None:
        """The database check, inside the append's transaction (no-op without a lease)."""
        if self.lease is not None:
            fence(conn, epoch)

    def refused(self, exc: Fenced) -> Fenced:
        """Count and log (once per epoch) a refused leader-only append, and step down."""
        self.fenced += 1
        if self._fenced_logged != self.epoch:
            self._fenced_logged = self.epoch
            log.warning("fenced: a leader-only append was refused (%s); this process "
                        "appends no decision and becomes a standby", exc)
        self._wake.set()  # the lease loop steps down at once
        return exc

    async def begin(self) -> bool:
        """Take the lease if it is free, without starting the leader's work yet (`run`
        does); whether this process leads."""
        if self.lease is not None and self.epoch is None:
            await self._round(self.lease, announce=False)
        return self.epoch is not None

    async def run(self) -> None:
        """The lease loop, until cancelled (then the lease is released) or failed
        (then this process stops leading; the supervisor runs the loop again)."""
        lease = self.lease
        if lease is None:
            await self._announce()
            await asyncio.Event().wait()  # leads until cancelled
            return
        try:
            await self._announce()  # an epoch taken by `begin`
            while True:
                await self._round(lease)
                every = lease.lease_s / 3 if self.epoch is not None else lease.lease_s / 4
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), every)
        finally:
            await self._release(lease)

    async def _announce(self) -> None:
        epoch = self.epoch
        if epoch is not None and self._announced != epoch:
            await self.on_lead(epoch)  # if it fails, the next run of the loop tries again
            self._announced = epoch

    async def _round(self, lease: Lease, announce: bool = True) -> None:
        started = self.monotonic()
        if self.epoch is not None:
            try:
                renewed = await asyncio.to_thread(lease.renew, self.epoch)
            except (SQLAlchemyError, StoreError) as exc:
                if self.monotonic() >= self.valid_until:
                    await self._follow(f"could not renew the lease ({exc})")
                else:
                    log.warning("could not renew the leader lease: %s", exc)
                return
            if renewed and self._fenced_logged != self.epoch:
                self.valid_until = started + lease.lease_s
            else:
                await self._follow("a newer leader holds the lease" if not renewed else
                                   "an append was fenced")
        else:
            try:
                epoch = await asyncio.to_thread(lease.acquire)
            except (SQLAlchemyError, StoreError) as exc:
                log.warning("could not read the leader lease: %s", exc)
                return
            if epoch is not None:
                self.epoch, self.valid_until = epoch, started + lease.lease_s
                self.takeovers += 1
                log.info("leading: epoch %d (%s)", epoch, lease.holder)
                if announce:
                    await self._announce()
            elif self.on_standby is not None:
                await self.on_standby()
        with contextlib.suppress(SQLAlchemyError, StoreError):
            await asyncio.to_thread(lease.heartbeat, self.role, self.epoch,
                                    self.last_leader_seq, self.fenced)

    async def _follow(self, why: str) -> None:
        log.warning("no longer the leader (epoch %s): %s; standing by", self.epoch, why)
        epoch, self.epoch, self._announced = self.epoch, None, None
        await self.on_follow()
        if self.lease is not None and epoch is not None:
            # If the database still has it ours (we stepped down on our own clock), end
            # it now so that a standby need not wait it out.
            with contextlib.suppress(SQLAlchemyError, StoreError):
                await asyncio.to_thread(self.lease.release, epoch)

    async def _release(self, lease: Lease) -> None:
        epoch, self.epoch = self.epoch, None
        if epoch is not None:
            self._announced = None
            with contextlib.suppress(Exception):
                await self.on_follow()  # the leader's work (maybe half started) stops
            with contextlib.suppress(Exception):
                await asyncio.to_thread(lease.release, epoch)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(lease.forget)

    def status(self) -> dict[str, Any]:
        """This process's role and the ledger's leader, for `hub status`."""
        leader: dict[str, Any] | None = None
        processes: list[dict[str, Any]] = []
        lease = self.lease
        if lease is not None:
            with contextlib.suppress(SQLAlchemyError):
                info = lease.leader()
                leader = None if info is None else info.to_map()
                processes = lease.processes()
        else:
            leader = {"epoch": 0, "holder": "", "host": socket.gethostname(),
                      "pid": os.getpid(), "expires_in_s": None}
        me = {"role": self.role, "epoch": self.epoch, "holder": "" if lease is None
              else lease.holder, "pid": os.getpid(), "host": socket.gethostname(),
              "fenced": self.fenced, "takeovers": self.takeovers,
              "last_leader_seq": None if self.last_leader_seq < 0 else self.last_leader_seq,
              "lease_s": None if lease is None else lease.lease_s}
        return {"this": me, "leader": leader, "processes": processes}


STALLED_TRANSACTION_S = 30.0


def limit_stalled_transactions(engine: Engine, seconds: float = STALLED_TRANSACTION_S
                               ) -> None:
    """PostgreSQL ends a session of this engine that sits in an open transaction for
    `seconds`: a process paused in the middle of an append (it holds the chain-head lock)
    then stops the other processes' appends for that long at most, not for ever. The
    hub never keeps a transaction open that long on purpose. Connections opened
    before are closed (the pool opens new ones with the setting)."""
    ms = int(seconds * 1000)

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(f"SET idle_in_transaction_session_timeout = {ms}")
        cursor.close()
        dbapi_conn.commit()

    event.listen(engine, "connect", on_connect)
    engine.dispose()


class SingleProcessLock:
    """An exclusive lock on a file next to a SQLite ledger, held while `hub serve`
    runs: a second process on the same ledger is refused at start (`AlreadyServing`).
    The kernel drops it when the process ends, however it ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def take(cls, ledger: str) -> SingleProcessLock:
        path = Path(ledger + ".serve-lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AlreadyServing(
                f"another `hub serve` ({holder}) is serving the SQLite ledger {ledger}; "
                "one hub process per SQLite ledger (use PostgreSQL to run several: one "
                "leads, the others stand by)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the file drops the lock


class WriteLock:
    """The writer's lock: an asyncio lock in this process and, on PostgreSQL, an
    advisory lock across processes, taken in a transaction on a dedicated connection
    (see the module docstring). Use as `async with lock:`; `locked()` as asyncio's."""

    def __init__(self, engine: Engine | None, stalled_after_s: float = DEFAULT_LEASE_S
                 ) -> None:
        self._local = asyncio.Lock()
        pg = engine is not None and engine.dialect.name == "postgresql"
        self._engine = engine if pg else None
        self._stalled_ms = max(1000, int(stalled_after_s * 1000))
        self._conn: Connection | None = None

    def locked(self) -> bool:
        return self._local.locked()

    async def __aenter__(self) -> None:
        await self._local.acquire()
        if self._engine is None:
            return
        taking = asyncio.ensure_future(asyncio.to_thread(self._take))
        try:
            await asyncio.shield(taking)
        except BaseException:
            # Cancelled while waiting: the thread may still get the lock; give it back.
            with contextlib.suppress(BaseException):
                if await taking:
                    await asyncio.to_thread(self._give)
            self._local.release()
            raise

    async def __aexit__(self, *_exc: object) -> None:
        try:
            if self._engine is not None:
                await asyncio.to_thread(self._give)
        finally:
            self._local.release()

    def _take(self) -> bool:
        assert self._engine is not None
        try:
            if self._conn is None or self._conn.closed or self._conn.invalidated:
                conn = self._engine.connect()
                # A process paused while it holds the lock loses its session after
                # this long, so the other processes are not stopped with it.
                conn.exec_driver_sql(
                    f"SET idle_in_transaction_session_timeout = {self._stalled_ms}")
                conn.commit()
                self._conn = conn
            self._conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")
            return True
        except SQLAlchemyError as exc:
            self._drop()
            raise StoreError(f"cannot take the ledger's writer lock: {exc}") from exc

    def _give(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.commit()  # ends the transaction: the advisory lock goes with it
        except SQLAlchemyError:
            self._drop()  # a lost session holds no lock any more

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    def close(self) -> None:
        self._drop()
