"""Ledger benchmarks: append, group commit, verify, proofs and size, against raw sqlite3.

Every case runs in one process, in one run, against fresh ledgers in a temp dir, and
is printed in one table with its target (issue 3, "Benchmarks"):

  (a)  raw `sqlite3` executemany: the same rows (same columns and indexes), 1,000 per
       transaction, WAL, synchronous=FULL, body encoding and chain hash in Python (the
       store's own encoder), nothing else. Every "vs raw" ratio divides by this rate.
  (a1) raw `sqlite3`, one commit per row: what fsync allows on this disk.
  (b)  `LedgerStore.append_many`, 1,000 per call (chain + Merkle tree), BLAKE3 tree;
  (b2) the same with a SHA-256 tree;
  (c)  `GroupCommitter`, 100 asyncio appenders each awaiting its own append;
  (d)  `LedgerStore.append`, one entry and one commit per call;
  (e)  hashing only, one core: chain hash, Merkle leaf and nodes of every stored body,
       no I/O (the ceiling for verification on one core);
  (f)  `verify()` in one process; (g) `verify(jobs=cores)`;
  (h)  inclusion and consistency proofs on a freshly opened store with the database
       file dropped from the page cache (posix_fadvise), generation and verification;
  (i)  bytes on disk per entry (database + WAL, after a checkpoint).

Appends time only the store calls (events are made beforehand, in chunks, so a
million of them never sit in memory at once).

    .venv/bin/python scripts/bench_ledger.py [--entries 100000] [--single 2000]
        [--group 100000] [--proofs 50] [--jobs N]
        [--postgres-temp | --postgres-url postgresql+psycopg://USER@HOST/DB]
        [--pg-entries 100000]

`--postgres-temp` starts a throwaway local PostgreSQL (tests/pg.py, fsync on) and runs
(b)-(i) there too, at `--pg-entries`; `--postgres-url` uses an existing database that
holds no ledger yet (use a scratch database: the benchmark leaves its entries there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
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
from ledger.entry import CHAIN_DOMAIN, GENESIS_PREV, encode_body  # noqa: E402
from ledger.merkle import MerkleFrontier, verify_consistency, verify_inclusion  # noqa: E402
from ledger.storage.group_commit import GroupCommitter  # noqa: E402
from ledger.storage.store import LedgerStore, NewEvent  # noqa: E402
from ledger.storage.verify_parallel import default_jobs, verify_store  # noqa: E402

BATCH = 1000
APPENDERS = 100
CHUNK = 50_000  # events made at a time
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


def make_events(n: int, start: int = 0) -> list[NewEvent]:
    return [NewEvent(KIND, f"dev-{i % 5000:05d}", f"device:dev-{i % 5000:05d}",
                     make_payload(i)) for i in range(start, start + n)]  # fmt: skip


def chunks(n: int) -> Iterator[list[NewEvent]]:
    for start in range(0, n, CHUNK):
        yield make_events(min(CHUNK, n - start), start)


@dataclass
class Result:
    case: str
    backend: str
    count: int
    seconds: float
    note: str = ""
    target: str = ""  # e.g. ">= 150,000/s"
    met: bool | None = None
    ratio: bool = True  # compare with the raw baseline

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def _fsync_note(console: Console, result: Result) -> Result:
    console.print(f"{result.case} [{result.backend}]: {result.rate:,.0f}/s  {result.note}")
    return result


# -- SQLite raw baselines ---------------------------------------------------------------


def _raw_connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = FULL")
    con.execute(
        "CREATE TABLE ledger_entries (seq INTEGER PRIMARY KEY, ts BIGINT, kind TEXT, "
        "actor TEXT, subject TEXT, body BLOB, prev BLOB, hash BLOB)"
    )
    con.execute("CREATE INDEX ix_kind ON ledger_entries (kind)")
    con.execute("CREATE INDEX ix_subject ON ledger_entries (subject)")
    return con


def raw_batches(path: Path, n: int) -> Result:
    con = _raw_connect(path)
    prev, seq, spent = GENESIS_PREV, 0, 0.0
    sql = "INSERT INTO ledger_entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    for events in chunks(n):
        for start in range(0, len(events), BATCH):
            began = time.perf_counter()
            rows = []
            for ev in events[start : start + BATCH]:
                ts = time.time_ns()
                body = encode_body(seq, ts, ev.kind, ev.actor, ev.subject, ev.payload)
                digest = blake3.blake3(CHAIN_DOMAIN + prev + body).digest()
                rows.append((seq, ts, ev.kind, ev.actor, ev.subject, body, prev, digest))
                prev, seq = digest, seq + 1
            con.execute("BEGIN")
            con.executemany(sql, rows)
            con.execute("COMMIT")
            spent += time.perf_counter() - began
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    size = _disk_bytes(path)
    return Result("(a) raw sqlite3 executemany", "sqlite", n, spent,
                  f"{BATCH}/txn; {size / n:,.0f} B/entry on disk")  # fmt: skip


def raw_single(path: Path, n: int) -> Result:
    con = _raw_connect(path)
    prev = GENESIS_PREV
    sql = "INSERT INTO ledger_entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    events = make_events(n)
    began = time.perf_counter()
    for seq, ev in enumerate(events):
        ts = time.time_ns()
        body = encode_body(seq, ts, ev.kind, ev.actor, ev.subject, ev.payload)
        digest = blake3.blake3(CHAIN_DOMAIN + prev + body).digest()
        con.execute("BEGIN")
        con.execute(sql, (seq, ts, ev.kind, ev.actor, ev.subject, body, prev, digest))
        con.execute("COMMIT")
        prev = digest
    spent = time.perf_counter() - began
    con.close()
    return Result("(a1) raw sqlite3, one commit per row", "sqlite", n, spent,
                  "1/txn: the fsync floor of this disk")  # fmt: skip


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


# -- the store's cases ------------------------------------------------------------------


def store_batches(store: LedgerStore, n: int, case: str, backend: str) -> Result:
    spent = 0.0
    for events in chunks(n):
        for start in range(0, len(events), BATCH):
            batch = events[start : start + BATCH]
            began = time.perf_counter()
            store.append_many(batch)
            spent += time.perf_counter() - began
    return Result(case, backend, n, spent, f"{BATCH}/txn, {store.tree_hash.name} tree")


def group_commit(store: LedgerStore, n: int, backend: str) -> Result:
    events = make_events(n)
    sizes: list[int] = []

    async def run() -> float:
        async with GroupCommitter(store) as committer:
            write = committer._write

            def counted(batch: Any, culprits: Any) -> Any:
                sizes.append(sum(len(r.events) for r in batch))
                return write(batch, culprits)

            committer._write = counted  # type: ignore[method-assign]

            async def appender(k: int) -> None:
                for event in events[k::APPENDERS]:
                    await committer.append(event)  # each awaits its own entry

            began = time.perf_counter()
            await asyncio.gather(*(appender(k) for k in range(APPENDERS)))
            return time.perf_counter() - began

    spent = asyncio.run(run())
    note = (f"{APPENDERS} appenders; batch mean {statistics.mean(sizes):.0f}, "
            f"max {max(sizes)}, {len(sizes)} txns")  # fmt: skip
    return Result("(c) GroupCommitter, awaited appends", backend, n, spent, note,
                  ">= 20,000/s")  # fmt: skip


def one_at_a_time(store: LedgerStore, n: int, backend: str) -> Result:
    events = make_events(n)
    began = time.perf_counter()
    for ev in events:
        store.append(ev.kind, ev.actor, ev.subject, ev.payload)
    return Result("(d) append, one commit each", backend, n, time.perf_counter() - began,
                  "1/txn", ">= 3,000/s")  # fmt: skip


def hashing_only(store: LedgerStore, backend: str) -> Result:
    """Chain hash, leaf and nodes of every stored body: what verify must compute."""
    spent, count = 0.0, 0
    frontier = MerkleFrontier(store.tree_hash)
    digest = store.tree_hash.digest
    chain = blake3.blake3
    stop = store.count()
    for lo in range(0, stop, 20_000):
        rows = store.entry_rows(lo, min(lo + 20_000, stop))
        began = time.perf_counter()
        leaves = []
        for row in rows:
            body, prev = row[5], row[6]
            chain(CHAIN_DOMAIN + prev + body).digest()
            leaves.append(digest(b"\x00" + body))
        frontier.extend(leaves)
        spent += time.perf_counter() - began
        count += len(rows)
    return Result("(e) hashing only, 1 core (no I/O)", backend, count, spent,
                  f"chain + {store.tree_hash.name} leaf + nodes", ratio=False)  # fmt: skip


def verify_case(store: LedgerStore, jobs: int, backend: str) -> Result:
    began = time.perf_counter()
    result = verify_store(store, jobs=jobs)
    spent = time.perf_counter() - began
    if not result.ok:
        raise SystemExit(f"verification failed: {result}")
    if jobs == 1:
        return Result("(f) verify(), 1 process", backend, result.entries, spent,
                      "chain + every tree node", ratio=False)  # fmt: skip
    return Result(f"(g) verify(jobs={jobs})", backend, result.entries, spent,
                  f"{jobs} processes, segments joined", ">= 1,000,000/s",
                  ratio=False)  # fmt: skip


def _drop_cache(location: str) -> None:
    path = Path(location)
    if not path.exists():
        return  # PostgreSQL: its files belong to the server
    for file in path.parent.glob(path.name + "*"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def proof_cases(location: str, n: int, samples: int, backend: str) -> Iterator[Result]:
    """Each sample: drop the file from the page cache, open the store, time one proof."""
    gen: dict[str, list[float]] = {"inclusion": [], "consistency": []}
    check: dict[str, list[float]] = {"inclusion": [], "consistency": []}
    for k in range(samples):
        seq = (k * 7919 * 104729) % n
        m = 1 + (k * 15485863) % (n - 1)
        for kind in ("inclusion", "consistency"):
            _drop_cache(location)
            with LedgerStore.open(location, create=False) as store:
                th = store.tree_hash
                began = time.perf_counter()
                if kind == "inclusion":
                    proof = store.inclusion_proof(seq, n)
                else:
                    proof = store.consistency_proof(m, n)
                gen[kind].append(time.perf_counter() - began)
                root_n = store.root(n)
                if kind == "inclusion":
                    leaf = store.leaf_hash(seq)
                    began = time.perf_counter()
                    verify_inclusion(th, seq, n, leaf, proof, root_n)
                else:
                    root_m = store.root(m)
                    began = time.perf_counter()
                    verify_consistency(th, m, n, root_m, root_n, proof)
                check[kind].append(time.perf_counter() - began)
    for kind in ("inclusion", "consistency"):
        for what, times, target in (("generate", gen[kind], 1e-3), ("verify", check[kind], 1e-4)):
            med, best = statistics.median(times), min(times)
            yield Result(
                f"(h) {kind} proof, {what} (cold)", backend, len(times), sum(times),
                f"median {med * 1e6:,.0f} µs, best {best * 1e6:,.0f} µs",
                f"< {target * 1e6:,.0f} µs", med < target, ratio=False,
            )


def store_cases(
    backend: str,
    open_store: Callable[[str, str | None], contextlib.AbstractContextManager[LedgerStore]],
    n: int,
    args: argparse.Namespace,
    console: Console,
) -> Iterator[Result]:
    """(b)-(i) on one backend; `open_store(name, tree_hash)` gives an empty ledger."""
    with open_store("batches", "blake3") as store:
        yield _fsync_note(console, store_batches(store, n, "(b) append_many, BLAKE3 tree",
                                                 backend))  # fmt: skip
        location = store.url or store.location
    with open_store("batches-sha256", "sha256") as store:
        yield _fsync_note(console, store_batches(store, n, "(b2) append_many, SHA-256 tree",
                                                 backend))  # fmt: skip
    with open_store("group", None) as store:
        yield _fsync_note(console, group_commit(store, min(args.group, n), backend))
    with open_store("single", None) as store:
        yield _fsync_note(console, one_at_a_time(store, min(args.single, n), backend))
    with LedgerStore.open(location, create=False) as store:
        yield _fsync_note(console, hashing_only(store, backend))
        yield _fsync_note(console, verify_case(store, 1, backend))
        yield _fsync_note(console, verify_case(store, args.jobs, backend))
    yield from proof_cases(location, n, args.proofs, backend)


@contextlib.contextmanager
def postgres_url(args: argparse.Namespace) -> Iterator[str | None]:
    if args.postgres_temp:
        from tests.pg import PgServer

        with PgServer(durable=True) as server:
            yield server.create_database("bench")
    else:
        yield args.postgres_url


def postgres_cases(url: str, args: argparse.Namespace, console: Console) -> Iterator[Result]:
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    base = make_url(url)

    def database(name: str) -> str:
        return f"{base.database}_{name.replace('-', '_')}"

    @contextlib.contextmanager
    def fresh(name: str, tree_hash: str | None) -> Iterator[LedgerStore]:
        # One new database per case, like the SQLite files.
        admin = base.set(drivername="postgresql", database="postgres")
        with psycopg.connect(admin.render_as_string(False), autocommit=True) as pg:
            db = sql.Identifier(database(name))
            pg.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(db))
            pg.execute(sql.SQL("CREATE DATABASE {}").format(db))
        target = base.set(database=database(name)).render_as_string(False)
        with LedgerStore.open(target, tree_hash=tree_hash) as store:
            yield store

    n = args.pg_entries
    yield from store_cases("postgresql", fresh, n, args, console)
    batches = base.set(drivername="postgresql", database=database("batches"))
    with psycopg.connect(batches.render_as_string(False)) as pg:
        row = pg.execute(
            "SELECT pg_total_relation_size('ledger_entries') "
            "+ pg_total_relation_size('ledger_tiles')"
        ).fetchone()
    size = int(row[0]) if row else 0
    yield Result("(i) bytes on disk per entry", "postgresql", n, 0.0,
                 f"{size / n:,.0f} B/entry (tables + indexes)", ratio=False)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--single", type=int, default=2_000, help="entries for (a1) and (d)")
    parser.add_argument("--group", type=int, default=100_000, help="entries for (c)")
    parser.add_argument("--proofs", type=int, default=50, help="cold samples per proof kind")
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="processes for (g)")
    parser.add_argument("--pg-entries", type=int, default=100_000)
    pg = parser.add_mutually_exclusive_group()
    pg.add_argument("--postgres-url", help="also run (b)-(i) on this PostgreSQL server")
    pg.add_argument("--postgres-temp", action="store_true",
                    help="also run (b)-(i) on a throwaway local PostgreSQL (fsync on)")  # fmt: skip
    args = parser.parse_args()
    payload = len(canonical_encode(make_payload(0)))
    console = Console(width=160)
    load = os.getloadavg()
    console.print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
                  f"{os.cpu_count()} cores")  # fmt: skip
    results: list[Result] = []
    n = args.entries
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        work = Path(tmp)
        raw = _fsync_note(console, raw_batches(work / "raw.db", n))
        raw.target = "(baseline)"
        results.append(raw)
        results.append(_fsync_note(console, raw_single(work / "raw1.db", min(args.single, n))))

        @contextlib.contextmanager
        def sqlite_store(name: str, tree_hash: str | None) -> Iterator[LedgerStore]:
            with LedgerStore.open(work / f"{name}.db", tree_hash=tree_hash) as store:
                yield store

        for result in store_cases("sqlite", sqlite_store, n, args, console):
            results.append(result)
        with sqlite3.connect(work / "batches.db") as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = _disk_bytes(work / "batches.db")
        results.append(Result("(i) bytes on disk per entry", "sqlite", n, 0.0,
                              f"{size / n:,.0f} B/entry (entries, indexes, tree)",
                              ratio=False))  # fmt: skip
        with postgres_url(args) as url:
            if url is not None:
                results.extend(postgres_cases(url, args, console))
    for r in results:
        if r.case.startswith(("(b)", "(b2)")):
            r.target = ">= 150,000/s, >= 0.6x"
            r.met = r.rate >= 150_000 and r.rate >= 0.6 * raw.rate
        elif r.target.startswith(">=") and r.met is None:
            r.met = r.rate >= float(r.target.split()[1].rstrip("/s").replace(",", ""))
    load = os.getloadavg()
    title = (f"fleetledger ledger, {n:,} entries (PostgreSQL: {args.pg_entries:,}), "
             f"{payload}-byte payloads; load average after {load[0]:.2f}")  # fmt: skip
    table = Table("case", "backend", "n", "seconds", "per second", "vs raw", "target", "met",
                  "notes", title=title)  # fmt: skip
    for r in results:
        timed = r.seconds > 0
        table.add_row(
            r.case, r.backend, f"{r.count:,}", f"{r.seconds:.2f}" if timed else "",
            f"{r.rate:,.0f}" if timed else "",
            f"{r.rate / raw.rate:.2f}x" if r.ratio and timed else "",
            r.target, "" if r.met is None else ("yes" if r.met else "no"), r.note,
        )
    console.print(table)


if __name__ == "__main__":
    main()
