"""`ledger verify`, `export`, `verify-bundle`, `witness`, `witness-key` (an auditor's
and a witness's commands; registered on the app of ledger/cli.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from ledger.checkpoint import SignedCheckpoint, detect_fork, open_checkpoint
from ledger.cli import (
    DB_HELP,
    EXIT_DAMAGED,
    EXIT_OK,
    EXIT_USAGE,
    NATS_CA,
    NATS_PASSWORD_FILE,
    NATS_USER,
    _fail,
    _nats_login,
    _open,
    app,
)
from ledger.errors import KeyFileError, LedgerError, NoteError
from ledger.merkle import HASHES
from ledger.note import CosignatureSigner, CosignatureVerifier, Verifier, b64encode, parse_vkey
from ledger.signing import SigningKey
from ledger.storage.audit import check_against_checkpoint, verify_since
from ledger.storage.checkpoint_store import CheckpointStore
from ledger.storage.verify_parallel import default_jobs, verify_store

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
            _fail(f"cannot read key file {value}: {exc}", EXIT_USAGE)
        keys = [ln for ln in lines if ln and not ln.startswith("#")]
        if not keys:
            _fail(f"key file {value} holds no key", EXIT_USAGE)
        return keys[0]
    return value.strip()


def log_key(value: str | None, why: str) -> Verifier:
    if value is None:
        _fail(f"{why} needs the log's key: pass --log-key (the hub's HOME/log.vkey)", EXIT_USAGE)
    try:
        key = parse_vkey(_key_text(value))
    except NoteError as exc:
        _fail(f"--log-key: {exc}", EXIT_USAGE)
    if not isinstance(key, Verifier):
        _fail("--log-key is a cosignature (witness) key, not the log's note key", EXIT_USAGE)
    return key


def witness_keys(values: list[str] | None) -> list[CosignatureVerifier]:
    out = []
    for value in values or []:
        try:
            key = parse_vkey(_key_text(value))
        except NoteError as exc:
            _fail(f"--witness-key: {exc}", EXIT_USAGE)
        if not isinstance(key, CosignatureVerifier):
            _fail(f"--witness-key {value}: not a cosignature (type 0x04) key", EXIT_USAGE)
        out.append(key)
    return out


def _read_checkpoint(path: Path, log: Verifier, witnesses: list[CosignatureVerifier],
                     ) -> SignedCheckpoint:
    try:
        return open_checkpoint(path.read_bytes(), log, witnesses)
    except OSError as exc:
        _fail(f"cannot read checkpoint {path}: {exc}", EXIT_USAGE)
    except NoteError as exc:
        _fail(f"checkpoint {path} does not verify: {exc}", EXIT_DAMAGED)


# ---------------------------------------------------------------- verify


@app.command()
def verify(
    file: Path | None = typer.Argument(
        None, help="An export file (`ledger export`) to check offline, instead of --db.",
        metavar="[FILE]",
    ),
    db: str | None = typer.Option(None, "--db", help=DB_HELP, metavar="PATH"),
    checkpoints: list[Path] | None = typer.Option(
        None, "--checkpoint", help="A signed checkpoint note the ledger must agree with "
        "(repeatable).", metavar="FILE",
    ),
    since: Path | None = typer.Option(
        None, "--since-checkpoint", help="Verify only the entries after this trusted, "
        "signed checkpoint: O(new entries).", metavar="FILE",
    ),
    log_vkey: str | None = typer.Option(None, "--log-key", help=LOG_KEY_HELP, metavar="VKEY"),
    witness: list[str] | None = typer.Option(
        None, "--witness-key", help=WITNESS_KEY_HELP, metavar="VKEY"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
    jobs: int = typer.Option(
        0, "--jobs", min=0, help="Processes checking segments of a --db ledger in "
        "parallel (0: one per core; 1: a single process). The report is the same.",
        metavar="N",
    ),
) -> None:
    """Verify the hash chain and Merkle tree from the stored bytes alone.

    No payload is decoded and nothing from the hub is trusted.
    For every entry, in seq order: its seq follows the previous one with no gap, its
    prev equals the previous entry's hash (32 zero bytes for seq 0), its indexed
    columns match its body, and its stored hash equals
    BLAKE3("fleetledger/entry/v1\\0" + prev + body). The stored Merkle tree must match
    too: each entry's leaf is HASH(0x00 + body) and every stored subtree hash is the
    hash of its children.

    With --log-key, every checkpoint stored in the ledger and every --checkpoint FILE
    must verify and agree: the ledger must reach its tree size ("truncation below a
    signed checkpoint" otherwise) and have its root there ("fork" otherwise). Two
    checkpoints of one size with different roots are printed as fork evidence.

    FILE (an export) is checked the same way offline: the chain, the Merkle tree
    recomputed from the bodies, and each checkpoint in it against the recomputed roots.

    Exit 0 and print `OK: N entries, head HASH` when all hold; exit 1 and print
    `FAIL at seq S: PROBLEM` at the first entry that does not; exit 2 when the check
    cannot run (no such database, unreadable file, missing key).
    """
    if (file is None) == (db is None):
        _fail("give either an export FILE or --db (not both)", EXIT_USAGE)
    witnesses = witness_keys(witness)
    if file is not None:
        _verify_export(file, log_vkey, witnesses, as_json)
    assert db is not None
    if since is not None:
        _verify_since(db, since, log_key(log_vkey, "--since-checkpoint"), as_json)
    _verify_db(db, checkpoints or [], log_vkey, witnesses, as_json, jobs or default_jobs())


def _emit(doc: dict[str, Any], lines: list[str], as_json: bool, ok: bool) -> None:
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        typer.echo("\n".join(lines))
    raise typer.Exit(EXIT_OK if ok else EXIT_DAMAGED)


def _verify_db(db: str, files: list[Path], log_vkey: str | None,
               witnesses: list[CosignatureVerifier], as_json: bool, jobs: int = 1) -> None:
    log = log_key(log_vkey, "--checkpoint") if files or log_vkey else None
    store = _open(db)
    try:
        result = verify_store(store, jobs=jobs)
        signed: list[tuple[str, SignedCheckpoint]] = []
        if log is not None:
            for stored in CheckpointStore(store, create=False).all():
                try:
                    signed.append((f"stored checkpoint {stored.size}",
                                   open_checkpoint(stored.full_note(), log, witnesses)))
                except NoteError as exc:
                    problem = f"stored checkpoint of size {stored.size} does not verify: {exc}"
                    _emit({"ok": False, "problem": problem}, [f"FAIL: {problem}"], as_json, False)
            signed += [(str(f), _read_checkpoint(f, log, witnesses)) for f in files]
        problems = []
        if result.ok:
            for where, cp in signed:
                found = check_against_checkpoint(store, cp.checkpoint)
                if found is not None:
                    problems.append(f"{where}: {found}")
        forks = [str(fork) for i, (_, a) in enumerate(signed) for _, b in signed[i + 1:]
                 if (fork := detect_fork(a, b)) is not None]
    except LedgerError as exc:
        _fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    head = result.head_hash.hex() if result.head_hash is not None else None
    ok = result.ok and not problems and not forks
    doc = {
        "ok": ok, "entries": result.entries, "head_hash": head,
        "first_bad_seq": result.first_bad_seq, "problem": result.problem,
        "merkle_hash": store.tree_hash.name,
        "merkle_root": result.merkle_root.hex() if result.merkle_root else None,
        "db": store.location,
        "checkpoints": [{"source": w, "size": cp.checkpoint.size,
                         "root": cp.checkpoint.root.hex(),
                         "witnesses": sorted({c.name for c in cp.cosignatures})}
                        for w, cp in signed],
        "checkpoint_problems": problems, "forks": forks,
    }
    if result.ok:
        lines = [f"OK: {result.entries} entries, head {head or 'none (empty ledger)'}"]
        if signed and not problems:
            largest = max(cp.checkpoint.size for _, cp in signed)
            lines.append(f"OK: agrees with {len(signed)} signed checkpoint(s), the largest "
                         f"of tree size {largest}")
        lines = [*lines, *(f"FAIL: {p}" for p in problems)]
    else:
        lines = [f"FAIL at seq {result.first_bad_seq}: {result.problem}"]
    lines += [f"FAIL: {f}" for f in forks]
    _emit(doc, lines, as_json, ok)


def _verify_since(db: str, path: Path, log: Verifier, as_json: bool) -> None:
    cp = _read_checkpoint(path, log, [])
    store = _open(db)
    try:
        result = verify_since(store, cp.checkpoint)
    except LedgerError as exc:
        _fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    head = result.head_hash.hex() if result.head_hash is not None else None
    doc = {"ok": result.ok, "checkpoint_size": result.checkpoint_size,
           "checked": result.checked, "entries": result.entries, "head_hash": head,
           "merkle_root": result.root.hex() if result.root else None,
           "first_bad_seq": result.first_bad_seq, "problem": result.problem}
    if result.ok:
        lines = [f"OK: {result.checked} new entries after the checkpoint of tree size "
                 f"{result.checkpoint_size}; {result.entries} entries, head "
                 f"{head or 'none (empty ledger)'}"]
    else:
        lines = [f"FAIL at seq {result.first_bad_seq}: {result.problem}"]
    _emit(doc, lines, as_json, result.ok)


def _verify_export(path: Path, log_vkey: str | None, witnesses: list[CosignatureVerifier],
                   as_json: bool) -> None:
    from ledger.export import verify_export

    log = log_key(log_vkey, "") if log_vkey is not None else None
    try:
        result = verify_export(path, log, witnesses)
    except LedgerError as exc:
        _fail(str(exc), EXIT_DAMAGED if path.exists() else EXIT_USAGE)
    head = result.head_hash.hex() if result.head_hash is not None else None
    doc = {"ok": result.ok, "entries": result.entries, "head_hash": head,
           "merkle_hash": result.merkle_hash,
           "merkle_root": result.root.hex() if result.root else None,
           "checkpoints": [cp.checkpoint.size for cp in result.checkpoints],
           "signatures_checked": result.signatures_checked,
           "first_bad_seq": result.first_bad_seq, "problem": result.problem, "file": str(path)}
    if result.ok:
        lines = [f"OK: {result.entries} entries, head {head or 'none (empty ledger)'}"]
        if result.checkpoints:
            note = "" if result.signatures_checked else " (signatures NOT checked: no --log-key)"
            lines.append(f"OK: {len(result.checkpoints)} checkpoint(s) agree with the "
                         f"entries{note}")
    elif result.first_bad_seq is not None:
        lines = [f"FAIL at seq {result.first_bad_seq}: {result.problem}"]
    else:
        lines = [f"FAIL: {result.problem}"]
    _emit(doc, lines, as_json, result.ok)


# ---------------------------------------------------------------- export, bundles


@app.command()
def export(
    out: Path = typer.Argument(..., help="The file to write.", metavar="OUT"),
    db: str = typer.Option(..., "--db", help=DB_HELP, metavar="PATH"),
) -> None:
    """Write the whole ledger and its signed checkpoints to one portable file.

    The file is framed canonical msgpack (docs/PROTOCOL.md, "Export file"); anyone can
    check it offline with `ledger verify OUT --log-key VKEY`.
    """
    from ledger.storage.export import write_export

    store = _open(db)
    try:
        entries, cps = write_export(store, out)
    except LedgerError as exc:
        _fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    typer.echo(f"wrote {out}: {entries} entries, {cps} checkpoint(s)")


@app.command("verify-bundle")
def verify_bundle_cmd(
    file: Path = typer.Argument(..., help="A proof bundle from `ledger prove --out`."),
    log_vkey: str = typer.Option(..., "--log-key", help=LOG_KEY_HELP, metavar="VKEY"),
    witness: list[str] | None = typer.Option(
        None, "--witness-key", help=WITNESS_KEY_HELP, metavar="VKEY"),
    min_witnesses: int | None = typer.Option(
        None, "--min-witnesses", min=0,
        help="How many of the given witnesses must have cosigned (default: all of them)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """Check a proof bundle offline: the log signed the checkpoint, the entry's leaf
    HASH(0x00 + body) is in the checkpoint's tree (inclusion proof), and enough of the
    given witnesses cosigned it. Exit 0 if so, 1 if any check fails (named), 2 on usage."""
    from ledger.bundle import verify_bundle

    log = log_key(log_vkey, "verify-bundle")
    witnesses = witness_keys(witness)
    try:
        data = file.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc}", EXIT_USAGE)
    try:
        report = verify_bundle(data, log, witnesses, min_witnesses)
    except LedgerError as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "problem": str(exc)}))
        else:
            typer.echo(f"FAIL: {exc}")
        raise typer.Exit(EXIT_DAMAGED) from None
    e, cp = report.entry, report.checkpoint.checkpoint
    if as_json:
        typer.echo(json.dumps({
            "ok": True, "seq": e.seq, "kind": e.kind, "actor": e.actor, "subject": e.subject,
            "hash": e.hash.hex(), "tree_size": cp.size, "root": cp.root.hex(),
            "origin": cp.origin, "witnesses": report.witnesses,
            "merkle_hash": report.merkle_hash}))
        return
    typer.echo(f"OK: entry seq {e.seq} ({e.kind}, actor {e.actor}, subject {e.subject}) is in "
               f"{cp.origin} at tree size {cp.size}, root {b64encode(cp.root)}")
    typer.echo(f"    cosigned by: {', '.join(report.witnesses) or 'no listed witness'}")


# ---------------------------------------------------------------- witness


@app.command("witness-key")
def witness_key(
    out: Path = typer.Option(..., "--out", help="Where to write the new key (0600)."),
    name: str = typer.Option(..., "--name", help="The witness's key name, e.g. "
                             "witness.example/w1 (no spaces, no '+')."),
) -> None:
    """Make a witness key; print its cosignature verifier key (vkey), which the hub
    lists in HOME/witnesses and verifiers pass as --witness-key. Also writes OUT.vkey."""
    if out.exists():
        _fail(f"{out} exists; not overwriting a key", EXIT_USAGE)
    key = SigningKey.generate()
    try:
        vkey = CosignatureSigner.from_signing_key(name, key).vkey()
    except NoteError as exc:
        _fail(str(exc), EXIT_USAGE)
    key.save(out)
    out.with_name(out.name + ".vkey").write_text(vkey + "\n")
    typer.echo(vkey)


@app.command()
def witness(
    nats_url: str = typer.Option(..., "--nats", help="NATS URL of the hub's server."),
    log_vkey: str = typer.Option(..., "--log-vkey", "--log-key", help=LOG_KEY_HELP,
                                 metavar="VKEY"),
    key: Path = typer.Option(..., "--key", help="This witness's key (`ledger witness-key`)."),
    name: str = typer.Option(..., "--name", help="This witness's key name."),
    state: Path = typer.Option(..., "--state", help="JSON file remembering the last "
                               "checkpoint cosigned per log (created if missing)."),
    once: bool = typer.Option(False, "--once", help="Cosign the latest checkpoint, then exit."),
    merkle_hash: str | None = typer.Option(
        None, "--merkle-hash", help="Pin the log's tree hash (blake3 or sha256); default: "
        "as the hub says."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the hub."),
    nats_user: str | None = NATS_USER,
    nats_password_file: Path | None = NATS_PASSWORD_FILE,
    nats_ca: Path | None = NATS_CA,
) -> None:
    """Witness a hub's checkpoints: cosign each one that is consistent with the last one
    this witness cosigned (RFC 9162 consistency proof from the hub), and send the
    cosignature back. A fork or rollback is refused: both signed notes are printed and
    the witness exits 1. Runs until SIGTERM/Ctrl-C, or once with --once (exit 0 when
    cosigned, 1 when refused, 2 when it could not run)."""
    from ledger.errors import ForkDetected
    from ledger.net.remote import LedgerClient
    from ledger.net.witness_runner import WitnessRunner
    from ledger.witness import Witness, WitnessState

    log = log_key(log_vkey, "witness")
    login = _nats_login(nats_user, nats_password_file, nats_ca)
    if merkle_hash is not None and merkle_hash not in HASHES:
        _fail(f"--merkle-hash must be one of {', '.join(HASHES)}", EXIT_USAGE)
    try:
        witness_signing_key = SigningKey.load(key)
        w = Witness(name, witness_signing_key, {log.name: log}, WitnessState(state))
    except (KeyFileError, LedgerError) as exc:
        _fail(str(exc), EXIT_USAGE)

    def say(line: str) -> None:
        typer.echo(line)
        sys.stdout.flush()

    async def run() -> int:
        client = await LedgerClient.connect(nats_url, timeout=timeout, name=f"witness {name}",
                                            login=login)
        runner = WitnessRunner(w, client, say, HASHES.get(merkle_hash or ""))
        try:
            if once:
                return EXIT_OK if await runner.once() else EXIT_DAMAGED
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            follow = asyncio.create_task(runner.follow(
                lambda: typer.echo(f"witness {name} following {log.name} on {nats_url}",
                                   err=True)))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({follow, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if follow.done():
                follow.result()  # raises ForkDetected (or a bug)
            follow.cancel()
            return EXIT_OK
        finally:
            await client.close()

    try:
        code = asyncio.run(run())
    except ForkDetected as exc:
        say(str(exc.error))
        raise typer.Exit(EXIT_DAMAGED) from None
    except LedgerError as exc:
        _fail(str(exc), EXIT_USAGE)
    raise typer.Exit(code)


@app.command("checkpoint")
def checkpoint_cmd(
    db: str = typer.Option(..., "--db", help=DB_HELP, metavar="PATH"),
    size: int | None = typer.Option(None, "--size", min=0, help="Tree size; default: latest."),
    out: Path | None = typer.Option(None, "--out", help="Write the note to this file."),
) -> None:
    """Print a signed checkpoint stored in the ledger (the hub's), with its cosignatures:
    the note to keep for `ledger verify --checkpoint` / `--since-checkpoint`."""
    store = _open(db)
    try:
        cps = CheckpointStore(store, create=False)
        found = cps.latest() if size is None else cps.get(size)
    except LedgerError as exc:
        _fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    if found is None:
        _fail("no such checkpoint in this ledger" if size is not None
              else "this ledger holds no signed checkpoint yet", EXIT_USAGE)
    note = found.full_note()
    if out is None:
        typer.echo(note.decode(), nl=False)
        return
    out.write_bytes(note)
    typer.echo(f"wrote {out}: checkpoint of tree size {found.size}")
