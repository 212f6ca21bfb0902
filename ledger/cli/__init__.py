"""`ledger`: check and inspect a fleetledger ledger database without trusting the hub."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ledger.entry import Entry
from ledger.errors import LedgerError, LedgerNotFoundError, ProofError
from ledger.merkle import verify_inclusion
from ledger.storage.store import LedgerStore

# Exit codes: scripts tell "the ledger is damaged" from "the check could not run".
EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2

app = typer.Typer(
    help=(
        "Check and inspect a fleetledger ledger: the append-only, hash-chained record of "
        "every model lifecycle action on the fleet.\n\n"
        "Each entry's hash covers the hash of the entry before it, so editing, deleting "
        "or reordering any stored entry breaks the chain from that point on. "
        "`ledger verify` recomputes the chain from the stored bytes alone and names the "
        "first bad entry; `ledger show` lists the most recent entries. "
        "The entries are also the leaves of an RFC 9162 Merkle tree: `ledger root` prints "
        "its root and `ledger prove` an entry's inclusion proof."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click formatting re-flows the docstring paragraphs to the terminal width.
    rich_markup_mode=None,
)

DB_HELP = "The ledger database: a SQLite file path (the hub's ledger.db), or a SQLAlchemy URL."


# Signing in to the hub's NATS server (`ledger witness`, `ledger tail --follow --nats`).
NATS_USER = typer.Option(
    None, "--nats-user", envvar="LEDGER_NATS_USER", help="NATS user (the hub's `witness` "
    "user; its password is in the hub's HOME/nats/credentials.toml). Or put it in the URL.")
NATS_PASSWORD_FILE = typer.Option(
    None, "--nats-password-file", help="File whose first line is the NATS password (kept "
    "off the command line, where `ps` shows it); or set LEDGER_NATS_PASSWORD.")
NATS_CA = typer.Option(
    None, "--nats-ca", help="CA certificate (PEM) that signed the NATS server's TLS "
    "certificate: the hub's HOME/nats/tls/ca.pem when it runs with --tls.")


def _nats_login(user: str | None, password_file: Path | None, ca: Path | None) -> Any:
    """A ledger.remote.NatsLogin from the options above (imported late: it loads nats)."""
    from ledger.net.remote import NatsLogin

    password = os.environ.get("LEDGER_NATS_PASSWORD")
    if password_file is not None:
        try:
            password = password_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            _fail(f"cannot read a password from {password_file}: {exc or 'empty file'}",
                  EXIT_USAGE)
    if password is not None and user is None:
        _fail("a NATS password needs --nats-user (or LEDGER_NATS_USER)", EXIT_USAGE)
    if ca is not None and not ca.is_file():
        _fail(f"--nats-ca {ca}: no such file", EXIT_USAGE)
    return NatsLogin(user, password, ca)


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _open(db: str) -> LedgerStore:
    try:
        return LedgerStore.open(db, create=False)
    except LedgerNotFoundError as exc:
        _fail(f"{exc} (check the --db path)", EXIT_USAGE)
    except LedgerError as exc:
        _fail(str(exc), EXIT_USAGE)


def _iso(ts_ns: int) -> str:
    seconds = ts_ns // 1_000_000_000
    stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}Z"


def _jsonable(value: Any) -> Any:
    # JSON has no bytes; binary payload fields are shown as hex strings.
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "ts": entry.ts,
        "time": _iso(entry.ts),
        "kind": entry.kind,
        "actor": entry.actor,
        "subject": entry.subject,
        "payload": _jsonable(entry.payload),
        "prev": entry.prev.hex(),
        "hash": entry.hash.hex(),
    }


@app.command()
def show(
    db: str = typer.Option(..., "--db", help=DB_HELP, metavar="PATH"),
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
    store = _open(db)
    try:
        entries = store.tail(last)
    except LedgerError as exc:
        _fail(f"{exc} (run `ledger verify` to locate the damage)", EXIT_DAMAGED)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([_entry_json(e) for e in entries], indent=2))
        return
    table = Table(
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
        caption=f"{store.location}: last {len(entries)} entries",
    )
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("actor", no_wrap=True)
    table.add_column("subject", no_wrap=True)
    table.add_column("hash", no_wrap=True)
    for e in entries:
        table.add_row(str(e.seq), _iso(e.ts)[:-1], e.kind, e.actor, e.subject, e.hash.hex()[:12])
    Console().print(table)


@app.command()
def root(
    db: str = typer.Option(..., "--db", help=DB_HELP, metavar="PATH"),
    size: int | None = typer.Option(
        None, "--size", min=0, help="Tree size (number of entries); default: all."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """Print the Merkle tree root (RFC 9162) of the first SIZE entries.

    Prints `SIZE ROOT HASHNAME`, where HASHNAME (blake3 or sha256) is the tree's hash,
    chosen when the ledger was created. Exit 2 if SIZE is larger than the ledger.
    """
    store = _open(db)
    try:
        tree_size = store.count() if size is None else size
        root_hash = store.root(tree_size)
    except LedgerError as exc:
        _fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    name = store.tree_hash.name
    if as_json:
        typer.echo(json.dumps({"size": tree_size, "root": root_hash.hex(), "merkle_hash": name}))
    else:
        typer.echo(f"{tree_size} {root_hash.hex()} {name}")


@app.command()
def prove(
    db: str = typer.Option(..., "--db", help=DB_HELP, metavar="PATH"),
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
    store = _open(db)
    if out is not None:
        _write_bundle(store, seq, out)
        return
    try:
        tree_size = store.count() if size is None else size
        proof = store.inclusion_proof(seq, tree_size)
        root_hash = store.root(tree_size)
        entry = store.get(seq)
    except LedgerError as exc:
        _fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    th = store.tree_hash
    if entry is None:
        _fail(f"no entry with seq {seq}", EXIT_USAGE)
    leaf = th.leaf(entry.body)
    try:
        verify_inclusion(th, seq, tree_size, leaf, proof, root_hash)
    except ProofError as exc:
        _fail(f"the stored Merkle tree does not prove seq {seq}: {exc}", EXIT_DAMAGED)
    if as_json:
        doc = {
            "entry": _entry_json(entry),
            "body": entry.body.hex(),
            "merkle_hash": th.name,
            "leaf_index": seq,
            "leaf_hash": leaf.hex(),
            "tree_size": tree_size,
            "root": root_hash.hex(),
            "inclusion_proof": [h.hex() for h in proof],
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    lines = [
        f"entry      seq {entry.seq}, {entry.kind}, actor {entry.actor}, subject {entry.subject}, "
        f"time {_iso(entry.ts)}",
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
        _fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    try:
        out.write_bytes(data)
    except OSError as exc:
        _fail(f"cannot write {out}: {exc}", EXIT_USAGE)
    typer.echo(f"wrote {out}: proof bundle for seq {seq} ({len(data)} bytes)")


# They register `ledger verify`, `export`, `verify-bundle`, `witness`, `witness-key`
# (cli_audit) and `ledger query`, `tail` (cli_browse).
from ledger.cli import audit as cli_audit  # noqa: E402,F401
from ledger.cli import browse as cli_browse  # noqa: E402,F401


def main() -> None:
    app(prog_name="ledger")

