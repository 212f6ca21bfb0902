"""`ledger query` and `ledger tail`: search a ledger, and follow it as it grows."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ledger.cli._common import (
    DB,
    EXIT_USAGE,
    HOME,
    NATS_CA,
    NATS_PASSWORD_FILE,
    NATS_USER,
    entries_table,
    entry_json,
    fail,
    iso,
    ledger_db,
    nats_login,
    need_db,
    open_store,
    parse_time,
    print_json,
)
from ledger.entry import Entry
from ledger.errors import EntryError, LedgerError


def query(
    db: str | None = DB,
    home: Path | None = HOME,
    kind: list[str] | None = typer.Option(None, "--kind", help="Entry kind, e.g. "
                                          "model.released (repeatable: any of them)."),
    subject: str | None = typer.Option(None, "--subject", help="Subject prefix, e.g. "
                                       "model:kws/ or device:dev-0042."),
    actor: str | None = typer.Option(None, "--actor", help="Actor: an operator key id, a "
                                     "device id, or hub."),
    since: str | None = typer.Option(None, "--since", help="From this time on (ISO 8601, "
                                     "UTC by default, or ns)."),
    until: str | None = typer.Option(None, "--until", help="Before this time."),
    limit: int = typer.Option(100, "--limit", min=1, help="At most this many entries."),
    newest: bool = typer.Option(False, "--newest", help="The last LIMIT matches, not the "
                                "first."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array with payloads."),
) -> None:
    """Find entries by kind, subject prefix, actor and time range, in seq order.

    This reads the stored columns and does not check the chain; run `ledger verify`."""
    store = open_store(need_db(db, home))
    from ledger.storage.query import EntryFilter, query_entries

    flt = EntryFilter(tuple(kind or ()), subject, actor, parse_time(since, "--since"),
                      parse_time(until, "--until"))
    try:
        entries = query_entries(store, flt, limit, newest)
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    if as_json:
        print_json([entry_json(e) for e in entries], indent=2)
        return
    Console().print(entries_table(entries, f"{store.location}: {len(entries)} matching entries"))


def _line(e: Entry) -> str:
    return (f"{e.seq:>8}  {iso(e.ts)}  {e.kind:<24} {e.actor:<20} {e.subject:<28} "
            f"{e.hash.hex()[:12]}")


def tail(
    db: str | None = DB,
    home: Path | None = HOME,
    nats_url: str | None = typer.Option(None, "--nats", help="Follow the hub's live "
                                        "ledger.entry feed on this NATS server."),
    last: int = typer.Option(10, "--last", "-n", min=0, help="Recent entries to print first "
                             "(from --db)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new entries."),
    interval: float = typer.Option(0.5, "--interval", help="Seconds between database polls "
                                   "(--follow without --nats)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    nats_user: str | None = NATS_USER,
    nats_password_file: Path | None = NATS_PASSWORD_FILE,
    nats_ca: Path | None = NATS_CA,
) -> None:
    """Print the most recent entries, one per line; with --follow keep printing new ones
    as they are appended (from the hub's feed with --nats, else by polling --db).
    Stops on SIGTERM or Ctrl-C."""
    if db is not None or home is not None or nats_url is None:
        db = ledger_db(db, home)  # $LEDGER_DB (or $FLEET_HUB_HOME) only without --nats
    if db is None and nats_url is None:
        fail("give --db (or --home), --nats, or both", EXIT_USAGE)
    if nats_url is not None and not follow:
        fail("--nats needs --follow (it only carries new entries)", EXIT_USAGE)

    def emit(e: Entry) -> None:
        if as_json:
            print_json(entry_json(e))  # one document a line, each checked
        else:
            typer.echo(_line(e))
        sys.stdout.flush()

    after = -1
    if db is not None and last:
        store = open_store(db)
        try:
            for e in store.tail(last):
                emit(e)
                after = e.seq
            if after < 0:
                head = store.head()
                after = -1 if head is None else head.seq
        except LedgerError as exc:
            fail(str(exc), EXIT_USAGE)
        finally:
            store.close()
    if not follow:
        return
    if nats_url is not None:
        login = nats_login(nats_user, nats_password_file, nats_ca)
        asyncio.run(_follow_feed(nats_url, after, emit, login))
    else:
        assert db is not None
        _follow_db(db, after, interval, emit)


async def _follow_feed(url: str, after: int, emit: Callable[[Entry], None],
                       login: Any) -> None:
    from ledger.net.remote import ENTRY_SUBJECT, LedgerClient, RemoteError, entry_from_feed

    try:
        client = await LedgerClient.connect(url, name="ledger tail", login=login)
    except RemoteError as exc:
        fail(str(exc), EXIT_USAGE)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def on_entry(msg: object) -> None:
        try:
            entry = entry_from_feed(msg)  # type: ignore[arg-type]
        except EntryError as exc:
            typer.echo(f"warning: unreadable feed message: {exc}", err=True)
            return
        if entry.seq > after:
            emit(entry)

    try:
        await client.subscribe(ENTRY_SUBJECT, on_entry)
        typer.echo(f"following {ENTRY_SUBJECT} on {url}", err=True)
        await stop.wait()
    finally:
        await client.close()


def _follow_db(db: str, after: int, interval: float, emit: Callable[[Entry], None]) -> None:
    stopped = False

    def on_signal(*_: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, on_signal)
    store = open_store(db)
    from ledger.storage.query import EntryFilter, query_entries

    typer.echo(f"following {store.location}", err=True)
    try:
        while not stopped:
            for e in query_entries(store, EntryFilter(after_seq=after), limit=1000):
                emit(e)
                after = e.seq
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
