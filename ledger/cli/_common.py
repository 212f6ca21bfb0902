"""What the `ledger` commands share: the typer app, exit codes, common options, and
helpers to open a ledger, sign in to NATS, read keys and print entries.

The command groups (show.py, audit.py, witness.py, browse.py) import only this module;
ledger/cli/__init__.py registers their commands on `app`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import typer

from ledger.entry import Entry
from ledger.errors import LedgerError, LedgerNotFoundError, NoteError
from ledger.note import CosignatureVerifier, Verifier, parse_vkey
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


def nats_login(user: str | None, password_file: Path | None, ca: Path | None) -> Any:
    """A ledger.remote.NatsLogin from the options above (imported late: it loads nats)."""
    from ledger.net.remote import NatsLogin

    password = os.environ.get("LEDGER_NATS_PASSWORD")
    if password_file is not None:
        try:
            password = password_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            fail(f"cannot read a password from {password_file}: {exc or 'empty file'}",
                  EXIT_USAGE)
    if password is not None and user is None:
        fail("a NATS password needs --nats-user (or LEDGER_NATS_USER)", EXIT_USAGE)
    if ca is not None and not ca.is_file():
        fail(f"--nats-ca {ca}: no such file", EXIT_USAGE)
    return NatsLogin(user, password, ca)


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def open_store(db: str) -> LedgerStore:
    try:
        return LedgerStore.open(db, create=False)
    except LedgerNotFoundError as exc:
        fail(f"{exc} (check the --db path)", EXIT_USAGE)
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)


def iso(ts_ns: int) -> str:
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


def entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "ts": entry.ts,
        "time": iso(entry.ts),
        "kind": entry.kind,
        "actor": entry.actor,
        "subject": entry.subject,
        "payload": _jsonable(entry.payload),
        "prev": entry.prev.hex(),
        "hash": entry.hash.hex(),
    }


LOG_KEY_HELP = (
    "The log's verifier key: a C2SP vkey string NAME+HASH+BASE64, or a file holding one "
    "(the hub writes HOME/log.vkey)."
)
WITNESS_KEY_HELP = "A witness's cosignature verifier key (vkey string or file); repeatable."


def _key_text(value: str) -> str:
    path = Path(value)
    if "+" not in value or path.is_file():
        try:
            lines = [ln.strip() for ln in path.read_text().splitlines()]
        except OSError as exc:
            fail(f"cannot read key file {value}: {exc}", EXIT_USAGE)
        keys = [ln for ln in lines if ln and not ln.startswith("#")]
        if not keys:
            fail(f"key file {value} holds no key", EXIT_USAGE)
        return keys[0]
    return value.strip()


def log_key(value: str | None, why: str) -> Verifier:
    if value is None:
        fail(f"{why} needs the log's key: pass --log-key (the hub's HOME/log.vkey)", EXIT_USAGE)
    try:
        key = parse_vkey(_key_text(value))
    except NoteError as exc:
        fail(f"--log-key: {exc}", EXIT_USAGE)
    if not isinstance(key, Verifier):
        fail("--log-key is a cosignature (witness) key, not the log's note key", EXIT_USAGE)
    return key


def witness_keys(values: list[str] | None) -> list[CosignatureVerifier]:
    out = []
    for value in values or []:
        try:
            key = parse_vkey(_key_text(value))
        except NoteError as exc:
            fail(f"--witness-key: {exc}", EXIT_USAGE)
        if not isinstance(key, CosignatureVerifier):
            fail(f"--witness-key {value}: not a cosignature (type 0x04) key", EXIT_USAGE)
        out.append(key)
    return out
