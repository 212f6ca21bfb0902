"""`ledger`: check and inspect a fleetledger ledger database without trusting the hub."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ledger.entry import Entry
from ledger.errors import LedgerError, LedgerNotFoundError
from ledger.store import LedgerStore

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
        "first bad entry; `ledger show` lists the most recent entries."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click formatting re-flows the docstring paragraphs to the terminal width.
    rich_markup_mode=None,
)

DB_HELP = "The ledger database: a SQLite file path (the hub's ledger.db), or a SQLAlchemy URL."


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


@app.command()
def verify(
    db: str = typer.Option(..., "--db", help=DB_HELP, metavar="PATH"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """Verify the hash chain from the stored bytes alone.

    No payload is decoded and nothing from the hub is trusted.
    For every entry, in seq order: its seq follows the previous one with no gap, its
    prev equals the previous entry's hash (32 zero bytes for seq 0), its indexed
    columns match its body, and its stored hash equals
    BLAKE3("fleetledger/entry/v1\\0" + prev + body).

    Exit 0 and print `OK: N entries, head HASH` when all hold; exit 1 and print
    `FAIL at seq S: PROBLEM` at the first entry that does not; exit 2 when the check
    cannot run (no such database, unreadable file). Record the head hash: a later
    run that reports a different hash at that seq means history was rewritten.
    """
    store = _open(db)
    try:
        result = store.verify()
    except LedgerError as exc:
        _fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    head = result.head_hash.hex() if result.head_hash is not None else None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": result.ok,
                    "entries": result.entries,
                    "head_hash": head,
                    "first_bad_seq": result.first_bad_seq,
                    "problem": result.problem,
                    "db": store.location,
                }
            )
        )
    elif result.ok:
        typer.echo(f"OK: {result.entries} entries, head {head or 'none (empty ledger)'}")
    else:
        typer.echo(f"FAIL at seq {result.first_bad_seq}: {result.problem}")
    raise typer.Exit(EXIT_OK if result.ok else EXIT_DAMAGED)


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


def main() -> None:
    app(prog_name="ledger")


if __name__ == "__main__":
    main()
