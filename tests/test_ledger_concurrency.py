"""Two OS processes appending to one ledger at once: the database serialises them, so
the chain never forks and seq has no gaps (SQLite file and PostgreSQL)."""

from __future__ import annotations

import multiprocessing
import traceback
from multiprocessing.synchronize import Barrier

import pytest

from ledger.storage.store import LedgerStore

PER_PROCESS = 300
WRITERS = ("writer-a", "writer-b")


def append_from_process(url: str, name: str, start_together: Barrier) -> None:
    """Child process body: open the ledger (both at once), then append one entry at a
    time, so the two writers contend for the lock on every append."""
    try:
        with LedgerStore.open(url) as store:
            start_together.wait(timeout=60)
            for i in range(PER_PROCESS):
                store.append("test.appended", name, "ledger:concurrency", {"i": i})
    except BaseException:
        traceback.print_exc()
        raise


@pytest.mark.timeout(120)
def test_two_processes_append_without_gaps_or_forks(ledger_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, no inherited engines
    start_together = ctx.Barrier(len(WRITERS))
    procs = [
        ctx.Process(target=append_from_process, args=(ledger_url, name, start_together))
        for name in WRITERS
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(timeout=90)
            assert proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)

    with LedgerStore.open(ledger_url, create=False) as store:
        result = store.verify()
        entries = list(store.iter_entries())
    total = len(WRITERS) * PER_PROCESS
    assert result.ok and result.entries == total, result
    assert [e.seq for e in entries] == list(range(total))
    for name in WRITERS:  # every process's entries are there, in its own order
        assert [e.payload["i"] for e in entries if e.actor == name] == list(range(PER_PROCESS))
