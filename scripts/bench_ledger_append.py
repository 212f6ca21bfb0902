"""Append throughput of the ledger store on a temporary SQLite file.

    .venv/bin/python scripts/bench_ledger_append.py --entries 100000 --batch 1000

Appends `--entries` device-status-like entries in `append_many` batches of `--batch`
and prints entries per second (best of `--repeat` runs, each into a fresh file), by
the wall clock and per CPU-second of this process (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from ledger.storage.store import LedgerStore, NewEvent


def run(entries: int, batch: int, extra: dict[str, Any]) -> tuple[float, float]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        LedgerStore.open(Path(tmp) / "ledger.db", **extra) as store,
    ):
        start, cpu_start = time.perf_counter(), time.process_time()
        for first in range(0, entries, batch):
            store.append_many(
                [
                    NewEvent(
                        "device.update_applied",
                        f"dev-{i % 500:04d}",
                        f"device:dev-{i % 500:04d}",
                        {"model": "kws", "version": "3", "counter": i, "digest": b"\xab" * 32},
                    )
                    for i in range(first, min(first + batch, entries))
                ]
            )
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        assert store.count() == entries
    return entries / elapsed, entries / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tree-hash", default=None, help="Merkle tree hash: blake3 or sha256")
    args = parser.parse_args()
    # Passed only when given, so the script also runs against a store without the option.
    extra: dict[str, Any] = {"tree_hash": args.tree_hash} if args.tree_hash else {}
    runs = [run(args.entries, args.batch, extra) for _ in range(args.repeat)]
    rates = [wall for wall, _ in runs]
    print(
        f"{args.entries} entries in batches of {args.batch}: best {max(rates):,.0f} entries/s "
        f"wall clock (runs: {', '.join(f'{r:,.0f}' for r in rates)}); "
        f"best {max(cpu for _, cpu in runs):,.0f} entries per CPU-second of this process"
    )


if __name__ == "__main__":
    main()
