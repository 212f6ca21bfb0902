"""What the `ledger` commands share: the typer app, exit codes, common options, and
helpers to open a ledger, sign in to NATS, read keys and print entries.

The command groups (show.py, audit.py, witness.py, browse.py) import only this module;
ledger/cli/__init__.py registers their commands on `app`.
"""

from __future__ import annotations

import os
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich import box
from rich.table import Table

from ledger.entry import Entry
from ledger.errors import LedgerError, LedgerNotFoundError, NoteError
from ledger.json_output import emit
from ledger.note import CosignatureVerifier, Verifier, parse_vkey

# Exit codes: scripts tell "the ledger is damaged" from "the check could not run".
EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2

def examples(*lines: str) -> str:
    """The `Examples:` section of a command's help (its epilog), one command a line; the
    \\b keeps click from re-flowing the lines into one paragraph."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


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
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    # Plain click formatting re-flows the docstring paragraphs to the terminal width.
    rich_markup_mode=None,
    epilog=examples(
        "ledger verify --home hub-home --log-key hub-home/log.vkey",
        "ledger show --db hub-home/ledger.db --last 5",
        "LEDGER_DB=hub-home/ledger.db ledger query --kind model.released",
        "ledger --install-completion    (tab completion for your shell)",
    ),
)


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ledger (fleetledger) {version('fleetledger')}")
        except PackageNotFoundError:
            typer.echo("ledger (fleetledger) unknown (not installed)")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", callback=_show_version,
                                      is_eager=True, help="Print the version and exit."),
) -> None:
    pass

DB_HELP = ("The ledger database: a SQLite file path (the hub's ledger.db), or a SQLAlchemy "
           "URL. Default: --home's, else $LEDGER_DB, else $FLEET_HUB_HOME's.")
DB = typer.Option(None, "--db", help=DB_HELP, metavar="PATH")
HOME = typer.Option(
    None, "--home", metavar="DIR", help="A hub home (`hub init`): use the database its "
    "config.toml names, as `hub --home` does.")


def ledger_db(db: str | None, home: Path | None) -> str | None:
    """The database to open: --db, else --home's, else $LEDGER_DB, else $FLEET_HUB_HOME's;
    None when none of them is given."""
    if db is not None and home is not None:
        fail("give --db or --home, not both", EXIT_USAGE)
    if db is not None:
        return db
    if home is not None:
        return db_of_home(home)
    if os.environ.get("LEDGER_DB"):
        return os.environ["LEDGER_DB"]
    if os.environ.get("FLEET_HUB_HOME"):
        return db_of_home(Path(os.environ["FLEET_HUB_HOME"]))
    return None


def need_db(db: str | None, home: Path | None) -> str:
    found = ledger_db(db, home)
    if found is None:
        fail("which ledger? give --db PATH or --home DIR (or set LEDGER_DB)", EXIT_USAGE)
    return found


def db_of_home(home: Path) -> str:
    """The database a hub home's config.toml names (a path relative to the home, or a
    URL), read the way `hub` reads it; the ledger package does not import the hub."""
    config = home / "config.toml"
    try:
        doc = tomllib.loads(config.read_text())
    except FileNotFoundError:
        fail(f"{config} not found: is {home} a hub home (made by `hub init`)?", EXIT_USAGE)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        fail(f"cannot read {config}: {exc}", EXIT_USAGE)
    database = str(doc.get("database", "ledger.db"))
    if "://" in database or database.startswith("sqlite:"):
        return database
    path = Path(database)
    return str(path if path.is_absolute() else home / path)


def entries_table(entries: list[Entry], caption: str) -> Table:
    """seq, time, kind, actor, subject and the hash's first 12 hex digits. seq and the
    hash are never cut; the other columns fold on a narrow terminal."""
    table = Table(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, caption=caption)
    seq_width = max((len(str(e.seq)) for e in entries), default=3)
    table.add_column("seq", justify="right", no_wrap=True, min_width=seq_width)
    table.add_column("time (UTC)", no_wrap=True, min_width=19)
    for name in ("kind", "actor", "subject"):
        table.add_column(name, overflow="fold")
    table.add_column("hash", no_wrap=True, min_width=12)
    for e in entries:
        table.add_row(str(e.seq), iso(e.ts)[:-1], e.kind, e.actor, e.subject, e.hash.hex()[:12])
    return table


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


if TYPE_CHECKING:
    from ledger.storage.store import LedgerStore


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def open_store(db: str) -> LedgerStore:
    """Open an existing ledger database. The storage code needs the `hub` extra
    (SQLAlchemy), which a device install lacks: the offline checks of files
    (`verify-bundle`, `verify EXPORT`) work without it, a database does not."""
    try:
        from ledger.storage.store import LedgerStore
    except ModuleNotFoundError as exc:
        fail(f"reading a ledger database needs the `hub` extra ({exc.name} is not "
             "installed): pip install 'fleetledger[hub]'", EXIT_USAGE)
    try:
        return LedgerStore.open(db, create=False)
    except LedgerNotFoundError as exc:
        fail(f"{exc} (check the --db path)", EXIT_USAGE)
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)


def parse_time(value: str | None, what: str) -> int | None:
    """An ISO 8601 time (UTC unless it says otherwise), integer nanoseconds, or `now`."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    if value == "now":
        return time.time_ns()
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail(f"{what} {value!r} is not an ISO 8601 time (e.g. 2024-05-01T12:00:00Z) "
             "or integer nanoseconds", EXIT_USAGE)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp()) * 1_000_000_000 + parsed.microsecond * 1000


def iso(ts_ns: int) -> str:
    seconds = ts_ns // 1_000_000_000
    stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}Z"


def print_json(document: Any, indent: int | None = None) -> None:
    """Every `ledger ... --json` document is printed here, checked against its schema
    under FLEET_CHECK_JSON_SCHEMAS=1 (ledger/json_output.py)."""
    emit("ledger", document, indent=indent)


def rfc3339(ts_ns: int) -> str:
    """RFC 3339 UTC with microseconds, as every --json time (docs/CLI-JSON.md)."""
    return f"{iso(ts_ns)[:-1]}.{ts_ns % 1_000_000_000 // 1000:06d}Z"


def _jsonable(value: Any) -> Any:
    # JSON has no bytes; binary payload fields are shown as hex strings.
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# Payload fields that hold a signed envelope (msgpack): an operator's signed command, a
# device's signed status report (hub/events.py).
ENVELOPE_FIELDS = ("command", "report")


def decoded_envelope(raw: bytes) -> dict[str, Any] | None:
    """A signed envelope as --json shows it: the signed document decoded (bytes in it as
    hex), the signatures, and the envelope's exact bytes as hex (to check the signature
    again); None when `raw` is not one."""
    from ledger.encoding import canonical_decode
    from ledger.errors import EncodingError

    try:
        outer = canonical_decode(raw)
        if not isinstance(outer, dict) or not isinstance(outer.get("signed"), bytes):
            return None
        document = canonical_decode(outer["signed"])
    except EncodingError:
        return None
    signatures = outer.get("signatures")
    return {"document": _jsonable(document),
            "signatures": _jsonable(signatures if isinstance(signatures, list) else []),
            "hex": raw.hex()}


def payload_json(payload: dict[str, Any]) -> dict[str, Any]:
    """An entry's payload for --json: signed envelopes decoded (`ENVELOPE_FIELDS`), other
    bytes as hex."""
    shown = {}
    for key, value in payload.items():
        envelope = (decoded_envelope(value) if key in ENVELOPE_FIELDS
                    and isinstance(value, bytes) else None)
        shown[key] = envelope if envelope is not None else _jsonable(value)
    return shown


def entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "ts": entry.ts,
        "time": rfc3339(entry.ts),  # with microseconds, like every --json time
        "kind": entry.kind,
        "actor": entry.actor,
        "subject": entry.subject,
        "payload": payload_json(entry.payload),
        "prev": entry.prev.hex(),
        "hash": entry.hash.hex(),
    }


LOG_KEY_HELP = (
    "The log's verifier key: a C2SP vkey string NAME+HASH+BASE64, or a file holding one "
    "(the hub writes HOME/log.vkey, and every log key it ever had in HOME/log-keys/)."
)
LOG_KEYS_HELP = (
    LOG_KEY_HELP + " Repeatable. Log keys rotated in or out since are found from the trust "
    "roots recorded in the ledger, attested by checkpoints this key signed."
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


def log_keys(values: list[str] | None, why: str) -> list[Verifier]:
    """Every --log-key given (at least one), each a log note key."""
    if not values:
        log_key(None, why)
    keys = [log_key(v, why) for v in values or []]
    if len({k.name for k in keys}) > 1:
        fail("--log-key: the keys name different logs ("
             + ", ".join(sorted({k.name for k in keys})) + ")", EXIT_USAGE)
    return keys


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
