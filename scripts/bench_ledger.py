"""Ledger append throughput: LedgerStore and GroupCommitter against a raw sqlite3 baseline.

All cases append the same kind of entry (a ~300-byte payload) to fresh ledgers in a
temp dir, in one run; the baseline is plain `sqlite3` writing the same rows (same
columns and indexes, WAL, synchronous=FULL, 1,000 rows per transaction, body encoding
and chain hash computed in Python) without the store's other work (head read under the
write lock, Merkle tree nodes, SQLAlchemy). Ratio = case rate / baseline rate. Results
go into docs/BENCHMARKS.md by hand.

    .venv/bin/python scripts/bench_ledger.py [--entries 100000] [--single 2000]
        [--postgres-url postgresql+psycopg://USER@HOST/DB | --postgres-temp]

`--postgres-url` runs the LedgerStore cases on PostgreSQL too; the database must hold
no ledger yet (use a scratch database: the benchmark leaves its entries there).
`--postgres-temp` starts a throwaway local server for that (tests/pg.py, fsync on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import blake3  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ledger.encoding import canonical_encode  # noqa: E402
from ledger.entry import GENESIS_PREV, chain_hash, encode_body  # noqa: E402
from ledger.group_commit import GroupCommitter  # noqa: E402
from ledger.store import LedgerStore, NewEvent  # noqa: E402

BATCH = 1000
APPENDERS = 100
KIND = "device.update_applied"


def make_payload(i: int) -> dict[str, Any]:
    return {
        "device": f"dev-{i % 5000:05d}",
        "model": "kws/3",
        "release": f"kws-3-{i % 11}",
        "rollout": "r-17",
        "wave": i % 7,
        "status": "applied",
        "digest": blake3.blake3(i.to_bytes(8, "big")).digest(),
        "signature": bytes(64),
        "boot": 3,
        "counter": i,
        "note": "installed into slot B, preflight and smoke inference ok, switched atomically",
    }


def make_events(n: int) -> list[NewEvent]:
    return [NewEvent(KIND, f"dev-{i % 5000:05d}", f"device:dev-{i % 5000:05d}",
                     make_payload(i)) for i in range(n)]  # fmt: skip


@dataclass
class Result:
    case: str
    backend: str
    entries: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.entries / self.seconds


def timed(case: str, backend: str, run: Callable[[], tuple[int, str]]) -> Result:
    start = time.perf_counter()
    entries, note = run()
    return Result(case, backend, entries, time.perf_counter() - start, note)


# -- the cases -------------------------------------------------------------------------


def raw_sqlite(path: Path, events: list[NewEvent]) -> tuple[int, str]:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = FULL")
    con.execute(
        "CREATE TABLE ledger_entries (seq INTEGER PRIMARY KEY, ts BIGINT, kind TEXT, "
        "actor TEXT, subject TEXT, body BLOB, prev BLOB, hash BLOB)"
    )
    con.execute("CREATE INDEX ix_kind ON ledger_entries (kind)")
    con.execute("CREATE INDEX ix_subject ON ledger_entries (subject)")
    prev = GENESIS_PREV
    for start in range(0, len(events), BATCH):
        rows = []
        for seq in range(start, min(start + BATCH, len(events))):
            ev = events[seq]
            ts = time.time_ns()
            body = encode_body(seq, ts, ev.kind, ev.actor, ev.subject, ev.payload)
            digest = chain_hash(prev, body)
            rows.append((seq, ts, ev.kind, ev.actor, ev.subject, body, prev, digest))
            prev = digest
        con.execute("BEGIN")
        con.executemany("INSERT INTO ledger_entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        con.execute("COMMIT")
    con.close()
    return len(events), f"{BATCH}/txn"


def store_batches(store: LedgerStore, events: list[NewEvent]) -> tuple[int, str]:
    for start in range(0, len(events), BATCH):
        store.append_many(events[start : start + BATCH])
    return len(events), f"{BATCH}/txn"


def group_commit(store: LedgerStore, events: list[NewEvent]) -> tuple[int, str]:
    async def run() -> int:
        async with GroupCommitter(store) as committer:

            async def appender(k: int) -> None:
                for event in events[k::APPENDERS]:
                    await committer.append(event)  # each awaits its own entry

            await asyncio.gather(*(appender(k) for k in range(APPENDERS)))
        return committer.transactions

    transactions = asyncio.run(run())
    return len(events), f"{APPENDERS} appenders, {len(events) / transactions:.0f}/txn"


def one_at_a_time(store: LedgerStore, events: list[NewEvent]) -> tuple[int, str]:
    for ev in events:
        store.append(ev.kind, ev.actor, ev.subject, ev.payload)
    return len(events), "1/txn"


def verify_all(store: LedgerStore) -> tuple[int, str]:
    result = store.verify()
    if not result.ok:
        raise SystemExit(f"verification failed: {result}")
    return result.entries, "hash chain"


# -- running ---------------------------------------------------------------------------


def store_cases(
    backend: str,
    open_store: Callable[[str], contextlib.AbstractContextManager[LedgerStore]],
    events: list[NewEvent],
    single: int,
) -> Iterator[Result]:
    """(b)-(e) on one backend; `open_store(name)` gives an empty ledger for case `name`."""
    with open_store("batches") as store:
        yield timed("(b) LedgerStore.append_many", backend, lambda: store_batches(store, events))
    with open_store("group") as store:
        yield timed("(c) GroupCommitter, awaited appends", backend,
                    lambda: group_commit(store, events))  # fmt: skip
    with open_store("single") as store:
        yield timed("(d) append, one at a time", backend,
                    lambda: one_at_a_time(store, events[:single]))  # fmt: skip
    with open_store("batches") as store:
        yield timed("(e) verify()", backend, lambda: verify_all(store))


@contextlib.contextmanager
def postgres_url(args: argparse.Namespace) -> Iterator[str | None]:
    if args.postgres_temp:
        from tests.pg import PgServer

        with PgServer(durable=True) as server:
            yield server.create_database("bench")
    else:
        yield args.postgres_url


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--single", type=int, default=2_000, help="entries for case (d)")
    pg = parser.add_mutually_exclusive_group()
    pg.add_argument("--postgres-url", help="also run (b)-(e) on this empty PostgreSQL ledger")
    pg.add_argument("--postgres-temp", action="store_true",
                    help="also run (b)-(e) on a throwaway local PostgreSQL (fsync on)")  # fmt: skip
    args = parser.parse_args()
    events = make_events(args.entries)
    single = min(args.single, args.entries)
    payload = len(canonical_encode(events[0].payload))
    console = Console(width=150)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        work = Path(tmp)
        results.append(timed("(a) raw sqlite3 executemany", "sqlite",
                             lambda: raw_sqlite(work / "raw.db", events)))  # fmt: skip
        console.print(f"baseline: {results[0].rate:,.0f} entries/s")
        for result in store_cases(
            "sqlite", lambda name: LedgerStore.open(work / f"{name}.db"), events, single
        ):
            console.print(f"{result.case} sqlite: {result.rate:,.0f} entries/s")
            results.append(result)
        with postgres_url(args) as url:
            if url is not None:
                results.extend(postgres_cases(url, events, single, console))
    baseline = results[0].rate
    title = f"Ledger append, {args.entries:,} entries, {payload}-byte payloads"
    table = Table("case", "backend", "entries", "seconds", "entries/s", "vs raw", "notes",
                  title=title)  # fmt: skip
    for r in results:
        table.add_row(r.case, r.backend, f"{r.entries:,}", f"{r.seconds:.2f}",
                      f"{r.rate:,.0f}", f"{r.rate / baseline:.2f}x", r.note)  # fmt: skip
    console.print(table)


def postgres_cases(
    url: str, events: list[NewEvent], single: int, console: Console
) -> Iterator[Result]:
    # One database, so the cases share one chain, run in turn: (c) and (d) append after
    # (b)'s entries, and (e) verifies everything.
    with LedgerStore.open(url) as probe:
        if probe.count():
            raise SystemExit(f"{probe.location} already holds a ledger; use a scratch database")
    for result in store_cases("postgresql", lambda _name: LedgerStore.open(url), events, single):
        if result.case.startswith("(e)"):
            result.note = "hash chain, all cases' entries"
        console.print(f"{result.case} postgresql: {result.rate:,.0f} entries/s")
        yield result


if __name__ == "__main__":
    main()
