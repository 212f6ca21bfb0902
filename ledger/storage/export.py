"""Write a store's ledger as a portable export file (the format is ledger/export.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ledger.durable import atomic_write
from ledger.encoding import canonical_encode
from ledger.entry import HASH_NAME
from ledger.errors import ExportError
from ledger.export import EXPORT_FORMAT, frame
from ledger.note import parse_note
from ledger.storage.checkpoint_store import CheckpointStore, StoredCheckpoint
from ledger.storage.store import LedgerStore


def write_export(store: LedgerStore, out: Path) -> tuple[int, int]:
    """Write the ledger (as of now) with its stored checkpoints to `out`, atomically.
    Returns (entries, checkpoints) written."""
    checkpoints = CheckpointStore(store, create=False)
    size = store.count()
    cps = checkpoints.all(max_size=size)
    origins = set()
    for cp in cps:
        text, _ = parse_note(cp.note)
        origins.add(text.split("\n", 1)[0])
    if len(origins) > 1:
        raise ExportError(f"the stored checkpoints name several origins: {sorted(origins)}")
    header = {
        "format": EXPORT_FORMAT, "hash": HASH_NAME, "merkle_hash": store.tree_hash.name,
        "origin": origins.pop() if origins else None, "entries": size, "checkpoints": len(cps),
    }
    try:
        atomic_write(out, _frames(store, header, cps, size), 0o644)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc}") from exc
    return size, len(cps)


def _frames(store: LedgerStore, header: dict[str, Any], cps: Sequence[StoredCheckpoint],
            size: int) -> Iterator[bytes]:
    yield frame(header)
    for cp in cps:
        yield frame(canonical_encode(cp.full_note()))
    written = 0
    for row in store.iter_raw():
        if row.seq >= size:
            break
        yield frame([row.body, row.prev, row.hash])
        written += 1
    # Raised inside the write, so the half-written temp file is removed and `out` untouched.
    if written != size:
        raise ExportError(f"read {written} entries, expected {size}")
