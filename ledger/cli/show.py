"""`ledger show`, `root` and `prove`: read a ledger database and its Merkle tree."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from ledger.cli._common import (
    DB,
    EXIT_DAMAGED,
    EXIT_USAGE,
    HOME,
    entries_table,
    entry_json,
    fail,
    iso,
    need_db,
    open_store,
    print_json,
)
from ledger.errors import LedgerError, ProofError
from ledger.merkle import verify_inclusion

if TYPE_CHECKING:
    from ledger.storage.store import LedgerStore


def show(
    db: str | None = DB,
    home: Path | None = HOME,
    last: int = typer.Option(20, "--last", "-n", min=1, help="How many recent entries."),
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON array with payloads (bytes as hex)."
    ),
) -> None:
    """List the most recent entries.

    Shows seq, time (UTC), kind, actor, subject and the first 12 hex digits of the hash.

    This reads entries as stored and does not check the chain; run `ledger verify`
    for that. Use --json to see payloads.
    """
    store = open_store(need_db(db, home))
    try:
        entries = store.tail(last)
    except LedgerError as exc:
        fail(f"{exc} (run `ledger verify` to locate the damage)", EXIT_DAMAGED)
    finally:
        store.close()
    if as_json:
        print_json([entry_json(e) for e in entries], indent=2)
        return
    Console().print(entries_table(entries, f"{store.location}: last {len(entries)} entries"))


def root(
    db: str | None = DB,
    home: Path | None = HOME,
    size: int | None = typer.Option(
        None, "--size", min=0, help="Tree size (number of entries); default: all."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """Print the Merkle tree root (RFC 9162) of the first SIZE entries.

    Prints `SIZE ROOT HASHNAME`, where HASHNAME (blake3 or sha256) is the tree's hash,
    chosen when the ledger was created. Exit 2 if SIZE is larger than the ledger.
    """
    store = open_store(need_db(db, home))
    try:
        tree_size = store.count() if size is None else size
        root_hash = store.root(tree_size)
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    name = store.tree_hash.name
    if as_json:
        print_json({"size": tree_size, "root": root_hash.hex(), "merkle_hash": name})
    else:
        typer.echo(f"{tree_size} {root_hash.hex()} {name}")


def prove(
    db: str | None = DB,
    home: Path | None = HOME,
    seq: int = typer.Option(..., "--seq", min=0, help="The entry to prove."),
    size: int | None = typer.Option(
        None, "--size", min=1, help="Tree size to prove it in; default: all entries."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
    out: Path | None = typer.Option(
        None, "--out", help="Write a proof bundle (entry, inclusion proof at the latest "
        "signed checkpoint, the checkpoint with its cosignatures) to this file instead; "
        "check it with `ledger verify-bundle`.", metavar="BUNDLE",
    ),
) -> None:
    """Print an entry with its Merkle inclusion proof (RFC 9162 §2.1.3).

    With --out, write a proof bundle instead: the proof is then for the tree size of
    the latest signed checkpoint (the hub's `ledger_checkpoints`), so anyone holding
    the log's verifier key can check it offline with `ledger verify-bundle`.

    Shows the entry, its leaf hash HASH(0x00 + body), the tree size and root, and the
    proof: the hashes from the leaf's sibling up to the root's child. The proof is
    checked before it is printed: exit 1 if it does not lead from this entry's body
    to the root (the stored tree is damaged; run `ledger verify`), 2 if SEQ or SIZE
    is out of range.
    """
    store = open_store(need_db(db, home))
    if out is not None:
        _write_bundle(store, seq, out)
        return
    try:
        tree_size = store.count() if size is None else size
        proof = store.inclusion_proof(seq, tree_size)
        root_hash = store.root(tree_size)
        entry = store.get(seq)
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    th = store.tree_hash
    if entry is None:
        fail(f"no entry with seq {seq}", EXIT_USAGE)
    leaf = th.leaf(entry.body)
    try:
        verify_inclusion(th, seq, tree_size, leaf, proof, root_hash)
    except ProofError as exc:
        fail(f"the stored Merkle tree does not prove seq {seq}: {exc}", EXIT_DAMAGED)
    if as_json:
        doc = {
            "entry": entry_json(entry),
            "body": entry.body.hex(),
            "merkle_hash": th.name,
            "leaf_index": seq,
            "leaf_hash": leaf.hex(),
            "tree_size": tree_size,
            "root": root_hash.hex(),
            "inclusion_proof": [h.hex() for h in proof],
        }
        print_json(doc, indent=2)
        return
    lines = [
        f"entry      seq {entry.seq}, {entry.kind}, actor {entry.actor}, subject {entry.subject}, "
        f"time {iso(entry.ts)}",
        f"hash       {entry.hash.hex()}",
        f"leaf hash  {leaf.hex()} ({th.name})",
        f"tree size  {tree_size}",
        f"root       {root_hash.hex()}",
        f"proof      {len(proof)} hashes, leaf's sibling first",
        *(f"  {i:>2}  {h.hex()}" for i, h in enumerate(proof)),
    ]
    typer.echo("\n".join(lines))


def _write_bundle(store: LedgerStore, seq: int, out: Path) -> None:
    from ledger.storage.bundles import make_bundle

    try:
        data = make_bundle(store, seq)
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    try:
        out.write_bytes(data)
    except OSError as exc:
        fail(f"cannot write {out}: {exc}", EXIT_USAGE)
    typer.echo(f"wrote {out}: proof bundle for seq {seq} ({len(data)} bytes)")
