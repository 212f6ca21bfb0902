"""Verification on every core: segments of the ledger checked in parallel, seams joined.

Each entry stores its `prev`, so a segment of the chain can be checked without the
entries before it, except for one comparison at its start: its first `prev` must be
the hash the previous segment ends with. The segments are aligned subtrees of the
Merkle tree (2**level entries each), so a worker also checks every stored node inside
its segment and hands back the segment's root; the parent joins the roots into the
nodes above the segments and compares those with the stored ones.

Workers are processes (the hashing holds the GIL), each with its own read connection.
When any segment, seam or upper node is wrong, the parent verifies again in one
process from the start of the first bad segment (`verify_chain` with a `VerifyStart`),
so the report (first bad seq, problem, good entries, head, root) is exactly the one
the sequential verifier gives.

It reads the ledger only through the store's public segment reads (`count_and_last_seq`,
`entry_rows`, `tree_nodes`, `verify_from`); `verify_store` is the entry point.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.context import BaseContext

from ledger.entry import GENESIS_PREV
from ledger.merkle import HASHES, MerkleFrontier
from ledger.storage.store import LedgerStore
from ledger.tiles import is_stored_level
from ledger.verify import (
    SegmentCheck,
    StoredRow,
    VerifyResult,
    VerifyStart,
    check_segment,
    truncated_problem,
)

# Entries per read inside a segment (a power of two: batches stay aligned).
READ_BATCH = 4096
# Segments are 2**level entries: large enough that a segment's setup is noise, small
# enough that every worker gets several (the last one is usually short).
MIN_SEGMENT_LEVEL = 12
MAX_SEGMENT_LEVEL = 17
SEGMENTS_PER_JOB = 4

_worker_store: LedgerStore | None = None


def default_jobs() -> int:
    """The number of cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def segment_level(entries: int, jobs: int) -> int:
    """log2 of the segment size for `entries` shared by `jobs` processes."""
    per_segment = max(1, entries // (jobs * SEGMENTS_PER_JOB))
    return max(MIN_SEGMENT_LEVEL, min(MAX_SEGMENT_LEVEL, per_segment.bit_length() - 1))


def verify_store(
    store: LedgerStore, expected_head: tuple[int, bytes] | None = None, *, jobs: int = 1
) -> VerifyResult:
    """What `LedgerStore.verify` says, computed in `jobs` processes when jobs > 1: the
    same result, first bad seq included, the stored root checked too."""
    if jobs <= 1:
        return store.verify(expected_head)
    return store.check_stored_root(verify_parallel(store, expected_head, jobs))


def verify_parallel(
    store: LedgerStore, expected_head: tuple[int, bytes] | None, jobs: int
) -> VerifyResult:
    """`verify_chain` over the whole ledger in `jobs` processes (see the module doc).
    The caller still compares the root with the stored one (`verify_store` does)."""
    count, head = store.count_and_last_seq()
    entries = 0 if head is None else head + 1
    level = segment_level(entries, jobs)
    size = 1 << level
    # One segment, or in memory: nothing to share. Rows missing (or stray rows below
    # seq 0, which no verifier reads): the one-process pass names the first gap at
    # once, and a wild seq cannot make millions of segments.
    if jobs < 2 or entries <= size or store.url is None or count != entries:
        return store.verify_from(expected_head, VerifyStart(0, GENESIS_PREV))
    th = store.tree_hash
    upper_nodes = store.tree_nodes(0, 0, max_level=level)  # every node above a segment
    upper = MerkleFrontier(th)  # the tree whose leaves are the full segments' roots
    prev, last = GENESIS_PREV, None
    tasks = [(start, min(start + size, entries), level) for start in range(0, entries, size)]
    for check in _run_in_order(tasks, expected_head, store.url, th.name, jobs):
        damaged = check.damaged or check.first_prev != prev
        completed = []
        if not damaged and check.stop - check.start == size:
            completed = upper.completed_by(check.subtrees[0])
            for up_level, idx, node in completed[1:]:
                stored = is_stored_level(level + up_level)
                if stored and upper_nodes.get((level + up_level, idx)) != node:
                    damaged = True
        if damaged:  # say exactly what, from here on, in this process
            start = VerifyStart(check.start, prev, tuple(upper.subtrees))
            return store.verify_from(expected_head, start)
        if completed:
            upper.advance(completed)
        else:  # the short last segment: its own right edge completes the tree's
            upper = MerkleFrontier(th, entries, upper.subtrees + list(check.subtrees))
        assert check.last_hash is not None  # not damaged: it has rows
        prev = last = check.last_hash
    root = upper.root()
    if expected_head is not None and entries <= expected_head[0]:
        return VerifyResult(False, entries, last, entries, truncated_problem(expected_head[0]),
                            root)  # fmt: skip
    return VerifyResult(True, entries, last, None, None, root)


def _run_in_order(
    tasks: list[tuple[int, int, int]],
    expected_head: tuple[int, bytes] | None,
    url: str | None,
    tree_hash: str,
    jobs: int,
) -> Iterator[SegmentCheck]:
    """The workers' results in task order, with at most 2 * jobs tasks queued: when the
    caller stops early, what is queued is cancelled (what runs finishes: one segment
    per worker at most). concurrent.futures, not multiprocessing.Pool, whose
    terminate() can hang while tasks are still being handed out."""
    with ProcessPoolExecutor(
        jobs, mp_context=_context(), initializer=_open_worker, initargs=(url, tree_hash)
    ) as pool:
        pending: deque[Future[SegmentCheck]] = deque()
        queued = iter(tasks)
        try:
            for task in queued:
                pending.append(pool.submit(_check_segment_task, task, expected_head))
                if len(pending) >= 2 * jobs:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _context() -> BaseContext:
    # fork starts workers in milliseconds, but is unsafe once a process runs threads
    # (the hub: its event loop's worker threads); spawn then.
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _open_worker(url: str | None, tree_hash: str) -> None:
    global _worker_store
    assert url is not None
    _worker_store = LedgerStore.open(url, create=False, tree_hash=tree_hash)


def _check_segment_task(
    task: tuple[int, int, int], expected_head: tuple[int, bytes] | None
) -> SegmentCheck:
    start, stop, level = task
    store = _worker_store
    assert store is not None, "worker not initialised"
    return check_segment(
        HASHES[store.tree_hash.name],
        start,
        stop,
        _batches(store, start, stop, level),
        expected_head,
    )


def _batches(
    store: LedgerStore, start: int, stop: int, level: int
) -> Iterator[tuple[list[StoredRow], dict[tuple[int, int], bytes]]]:
    for lo in range(start, stop, READ_BATCH):
        hi = min(lo + READ_BATCH, stop)
        yield store.entry_rows(lo, hi), store.tree_nodes(lo, hi, max_level=level)
