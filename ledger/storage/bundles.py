"""Make proof bundles from a store (the format and its check are ledger/bundle.py)."""

from __future__ import annotations

from ledger.bundle import BUNDLE_FORMAT
from ledger.encoding import canonical_encode
from ledger.errors import BundleError, ProofError
from ledger.merkle import verify_inclusion
from ledger.storage.checkpoint_store import CheckpointStore, StoredCheckpoint
from ledger.storage.store import LedgerStore


def make_bundle(store: LedgerStore, seq: int) -> bytes:
    """The proof bundle of entry `seq` at the latest stored checkpoint's size."""
    latest = CheckpointStore(store, create=False).latest()
    if latest is None:
        raise BundleError("the ledger has no signed checkpoint yet (the hub signs them)")
    return make_bundle_at(store, seq, latest)


def make_bundle_at(store: LedgerStore, seq: int, latest: StoredCheckpoint) -> bytes:
    """The proof bundle of entry `seq` in the stored checkpoint `latest` (with the
    cosignatures it carries)."""
    if seq >= latest.size:
        raise BundleError(f"seq {seq} is not covered by the latest checkpoint (tree size "
                          f"{latest.size}); wait for the hub's next checkpoint")
    entry = store.get(seq)
    if entry is None:
        raise BundleError(f"no entry with seq {seq}")
    th = store.tree_hash
    proof = store.inclusion_proof(seq, latest.size)
    try:
        verify_inclusion(th, seq, latest.size, th.leaf(entry.body), proof, latest.root)
    except ProofError as exc:
        raise BundleError(f"the stored tree does not prove seq {seq} in the checkpoint "
                          f"(run `ledger verify`): {exc}") from exc
    return canonical_encode({
        "format": BUNDLE_FORMAT, "merkle_hash": th.name, "seq": seq, "body": entry.body,
        "prev": entry.prev, "hash": entry.hash, "tree_size": latest.size,
        "inclusion_proof": proof, "checkpoint": latest.full_note(),
    })
