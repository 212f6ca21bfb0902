"""`ledger verify`, `export`, `verify-bundle` and `checkpoint`: an auditor's commands."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from ledger.checkpoint import (
    SignedCheckpoint,
    checkpoint_tree_hash,
    detect_fork,
    tree_hash_problem,
)
from ledger.cli._common import (
    DB,
    EXIT_DAMAGED,
    EXIT_OK,
    EXIT_USAGE,
    HOME,
    LOG_KEY_HELP,
    LOG_KEYS_HELP,
    WITNESS_KEY_HELP,
    fail,
    ledger_db,
    log_keys,
    need_db,
    open_store,
    print_json,
    witness_keys,
)
from ledger.errors import LedgerError, NoteError
from ledger.log_keys import ROOT_CHANGE_KINDS, LogKeyHistory, RootChainError
from ledger.note import CosignatureVerifier, b64encode

if TYPE_CHECKING:
    from ledger.storage.store import LedgerStore


def _read_checkpoint(path: Path, log: LogKeyHistory, witnesses: list[CosignatureVerifier],
                     ) -> SignedCheckpoint:
    try:
        return log.open(path.read_bytes(), witnesses)
    except OSError as exc:
        fail(f"cannot read checkpoint {path}: {exc}", EXIT_USAGE)
    except NoteError as exc:
        fail(f"checkpoint {path} does not verify: {exc}", EXIT_DAMAGED)


# ---------------------------------------------------------------- verify


def verify(
    file: Path | None = typer.Argument(
        None, help="An export file (`ledger export`) to check offline, instead of --db.",
        metavar="[FILE]",
    ),
    db: str | None = DB,
    home: Path | None = HOME,
    checkpoints: list[Path] | None = typer.Option(
        None, "--checkpoint", help="A signed checkpoint note the ledger must agree with "
        "(repeatable).", metavar="FILE",
    ),
    since: Path | None = typer.Option(
        None, "--since-checkpoint", help="Verify only the entries after this trusted, "
        "signed checkpoint: O(new entries) for a database (an export is read whole).",
        metavar="FILE",
    ),
    log_vkey: list[str] | None = typer.Option(None, "--log-key", help=LOG_KEYS_HELP,
                                              metavar="VKEY"),
    witness: list[str] | None = typer.Option(
        None, "--witness-key", help=WITNESS_KEY_HELP + " With witness keys, some checkpoint "
        "must be cosigned by --min-witnesses of them.", metavar="VKEY"),
    min_witnesses: int | None = typer.Option(
        None, "--min-witnesses", min=1, help="How many of the given witnesses must have "
        "cosigned a checkpoint (default: all of them).", metavar="K"),
    allow_no_checkpoint: bool = typer.Option(
        False, "--allow-no-checkpoint", help="With --log-key, pass a ledger that no signed "
        "checkpoint covers (a new hub's); by default that fails."),
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
    signed checkpoint" otherwise), have its root there ("fork" otherwise) and use the
    tree hash it signs. Two checkpoints of one size with different roots are printed as
    fork evidence. At least one checkpoint must verify (--allow-no-checkpoint waives
    this). With --witness-key, at least one of them must carry cosignatures by
    --min-witnesses of the given witnesses; the witnesses that cosigned are printed.

    Log-key rotations: each checkpoint must be signed by a log key valid at its tree
    size. Besides the --log-key keys (repeatable; old or current), those are the log
    keys the trust roots recorded in the ledger list (keys.rotated / keys.revoked),
    trusted once a checkpoint signed by an already trusted key covers one of them, the
    later ones as the root keys sign the chain (docs/PROTOCOL.md, "Root rotation").
    So HOME/log.vkey alone (once it signed a checkpoint) checks every checkpoint ever
    signed; so does an old vkey from HOME/log-keys/.

    FILE (an export) is checked the same way offline: the chain, the Merkle tree
    recomputed from the bodies, and each checkpoint in it or given with --checkpoint /
    --since-checkpoint against the recomputed roots.

    Exit 0 and print `OK: N entries, head HASH` when all hold; exit 1 and print
    `FAIL at seq S: PROBLEM` at the first entry that does not; exit 2 when the check
    cannot run (no such database, unreadable file, missing key).
    """
    if file is not None and (db is not None or home is not None):
        fail("give either an export FILE or --db/--home (not both)", EXIT_USAGE)
    rules = rules_of(log_vkey, witness, min_witnesses, allow_no_checkpoint)
    files = checkpoints or []
    if file is not None:
        _emit(verify_export_file(file, log_vkey, files, since, rules), as_json)
    path = ledger_db(db, home)
    if path is None:
        fail("give an export FILE, --db PATH or --home DIR (or set LEDGER_DB)", EXIT_USAGE)
    if since is not None:
        _emit(_verify_since(path, since, files,
                            LogKeyHistory(log_keys(log_vkey, "--since-checkpoint")), rules),
              as_json)
    _emit(verify_db(path, files, log_vkey, rules, jobs), as_json)


@dataclass(frozen=True)
class Verdict:
    """What `ledger verify` found: the JSON document, the report lines, and whether all
    held. `ledger report` shows the same verdict."""

    ok: bool
    doc: dict[str, Any]
    lines: list[str]


def rules_of(log_vkey: list[str] | None, witness: list[str] | None,
             min_witnesses: int | None, allow_no_checkpoint: bool) -> Rules:
    """The checkpoint rules of the --witness-key, --min-witnesses and
    --allow-no-checkpoint options (usage errors exit 2)."""
    witnesses = witness_keys(witness)
    if witnesses and not log_vkey:
        fail("--witness-key needs --log-key (cosignatures are on checkpoints the log "
             "signed)", EXIT_USAGE)
    if min_witnesses is not None and min_witnesses > len(witnesses):
        fail(f"--min-witnesses {min_witnesses} needs at least that many --witness-key",
             EXIT_USAGE)
    return Rules(witnesses, len(witnesses) if min_witnesses is None else min_witnesses,
                 allow_no_checkpoint)


@dataclass(frozen=True)
class Rules:
    """What the auditor asked of the checkpoints besides agreeing with the entries."""

    witnesses: list[CosignatureVerifier]
    need: int  # cosignatures by distinct given witnesses on some checkpoint
    allow_no_checkpoint: bool

    def check(self, signed: list[SignedCheckpoint]) -> tuple[list[str], list[str], dict[str, Any]]:
        """(problems, report lines, JSON fields) for the verified checkpoints `signed`."""
        if not signed:
            if self.allow_no_checkpoint:
                return [], ["WARNING: no signed checkpoint covers this ledger "
                            "(--allow-no-checkpoint)"], {"witnessed": None}
            return [NO_CHECKPOINT], [], {"witnessed": None}
        if not self.witnesses:
            return [], [], {"witnessed": None}
        best = max((cp for cp in signed if len(_cosigners(cp)) >= self.need),
                   key=lambda cp: cp.checkpoint.size, default=None)
        given = len(self.witnesses)
        if best is None:
            seen = sorted({n for cp in signed for n in _cosigners(cp)})
            return [f"no checkpoint is cosigned by {self.need} of the {given} given "
                    f"witness(es) (cosignatures found by: {', '.join(seen) or 'none'})"
                    ], [], {"witnessed": None}
        names = sorted(_cosigners(best))
        return [], [f"OK: witnessed: the checkpoint of tree size {best.checkpoint.size} is "
                    f"cosigned by {', '.join(names)} ({len(names)} of {given} given, "
                    f"{self.need} required)"], {
            "witnessed": {"size": best.checkpoint.size, "witnesses": names,
                          "required": self.need}}


NO_CHECKPOINT = ("no checkpoint signed by the given log key covers this ledger (pass "
                 "--allow-no-checkpoint to accept that)")


def _cosigners(cp: SignedCheckpoint) -> set[str]:
    return {c.name for c in cp.cosignatures}


def _checkpoint_doc(where: str, cp: SignedCheckpoint, tree_hash: str) -> dict[str, Any]:
    # tree_hash_signed False: a BLAKE3 checkpoint signed before the hash was bound.
    return {"source": where, "size": cp.checkpoint.size, "root": cp.checkpoint.root.hex(),
            "tree_hash_signed": checkpoint_tree_hash(cp.checkpoint) == tree_hash,
            "witnesses": sorted(_cosigners(cp))}


def _emit(verdict: Verdict, as_json: bool) -> NoReturn:
    if as_json:
        print_json(verdict.doc)
    else:
        typer.echo("\n".join(verdict.lines))
    raise typer.Exit(EXIT_OK if verdict.ok else EXIT_DAMAGED)


def _store_problem(store: LedgerStore, cp: SignedCheckpoint) -> str | None:
    from ledger.storage.audit import check_against_checkpoint

    # A BLAKE3 ledger's checkpoints signed before the tree hash was bound carry no line;
    # their roots are compared with roots recomputed from the entries all the same.
    mismatch = tree_hash_problem(cp.checkpoint, store.tree_hash.name, legacy=True)
    return mismatch or check_against_checkpoint(store, cp.checkpoint)


def _recorded_history(store: LedgerStore, pinned: list[Any],
                      notes: list[bytes]) -> LogKeyHistory:
    """The log keys valid when, from the trust roots the stored ledger records."""
    from ledger.storage import query

    with store.engine.connect() as conn:
        entries = list(query.iter_entries(conn, query.EntryFilter(kinds=ROOT_CHANGE_KINDS)))
    return LogKeyHistory.from_entries(pinned, entries, notes, follow_chain=True)


def verify_db(db: str, files: list[Path], log_vkey: list[str] | None, rules: Rules,
              jobs: int | None) -> Verdict:
    """Verify a ledger database as `ledger verify --db` does (usage errors exit 2)."""
    pinned = log_keys(log_vkey, "--checkpoint") if files or log_vkey else None
    store = open_store(db)  # first: it names the `hub` extra if storage is missing
    from ledger.storage.checkpoint_store import CheckpointStore
    from ledger.storage.verify_parallel import default_jobs, verify_store

    jobs = jobs or default_jobs()
    log: LogKeyHistory | None = None
    try:
        result = verify_store(store, jobs=jobs)
        signed: list[tuple[str, SignedCheckpoint]] = []
        if pinned is not None:
            stored_cps = CheckpointStore(store, create=False).all()
            try:
                log = _recorded_history(store, pinned, [c.full_note() for c in stored_cps])
            except RootChainError as exc:
                problem = f"log-key history: {exc}"
                return Verdict(False, {"ok": False, "problem": problem}, [f"FAIL: {problem}"])
            for stored in stored_cps:
                try:
                    signed.append((f"stored checkpoint {stored.size}",
                                   log.open(stored.full_note(), rules.witnesses)))
                except NoteError as exc:
                    problem = f"stored checkpoint of size {stored.size} does not verify: {exc}"
                    return Verdict(False, {"ok": False, "problem": problem}, [f"FAIL: {problem}"])
            signed += [(str(f), _read_checkpoint(f, log, rules.witnesses)) for f in files]
        problems = []
        if result.ok:
            for where, cp in signed:
                found = _store_problem(store, cp)
                if found is not None:
                    problems.append(f"{where}: {found}")
        forks = [str(fork) for i, (_, a) in enumerate(signed) for _, b in signed[i + 1:]
                 if (fork := detect_fork(a, b)) is not None]
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    ruled, rule_lines, rule_doc = (rules.check([cp for _, cp in signed]) if log is not None
                                   else ([], [], {"witnessed": None}))
    head = result.head_hash.hex() if result.head_hash is not None else None
    ok = result.ok and not problems and not forks and not ruled
    history = _history_doc(log)
    doc = {
        "ok": ok, "entries": result.entries, "head_hash": head,
        "first_bad_seq": result.first_bad_seq, "problem": result.problem,
        "merkle_hash": store.tree_hash.name,
        "merkle_root": result.merkle_root.hex() if result.merkle_root else None,
        "db": store.location,
        "checkpoints": [_checkpoint_doc(w, cp, store.tree_hash.name) for w, cp in signed],
        "checkpoint_problems": problems + ruled, "forks": forks, **rule_doc,
        "log_keys": history,
    }
    if result.ok:
        lines = [f"OK: {result.entries} entries, head {head or 'none (empty ledger)'}"]
        if signed and not problems:
            largest = max(cp.checkpoint.size for _, cp in signed)
            lines.append(f"OK: agrees with {len(signed)} signed checkpoint(s), the largest "
                         f"of tree size {largest}")
            if history is not None and history["roots"]:
                lines.append(f"OK: log keys followed through trust root versions "
                             f"{history['roots'][0]['version']}..{history['roots'][-1]['version']} "
                             f"recorded in the ledger ({len(history['keyids'])} log key(s))")
        lines = [*lines, *(f"FAIL: {p}" for p in problems)]
        if not problems:
            lines += [*rule_lines, *(f"FAIL: {p}" for p in ruled)]
    else:
        lines = [f"FAIL at seq {result.first_bad_seq}: {result.problem}"]
    lines += [f"FAIL: {f}" for f in forks]
    return Verdict(ok, doc, lines)


def _history_doc(log: LogKeyHistory | None) -> dict[str, Any] | None:
    """The log keys and recorded roots a verification used (JSON)."""
    if log is None:
        return None
    keyids = sorted({k for r in log.roots for k in r.log_keyids()})
    return {"pinned": [v.vkey() for v in log.pinned], "keyids": keyids,
            "roots": [{"version": r.version, "seq": r.seq, "log_keyids": list(r.log_keyids())}
                      for r in log.roots]}


def _verify_since(db: str, path: Path, files: list[Path], log: LogKeyHistory, rules: Rules,
                  ) -> Verdict:
    cp = _read_checkpoint(path, log, rules.witnesses)
    given = [(str(f), _read_checkpoint(f, log, rules.witnesses)) for f in files]
    store = open_store(db)
    from ledger.storage.audit import verify_since

    problems: list[str] = []
    try:
        mismatch = tree_hash_problem(cp.checkpoint, store.tree_hash.name, legacy=True)
        result = verify_since(store, cp.checkpoint)
        if mismatch is not None:
            problems.append(f"{path}: {mismatch}")
        if result.ok:
            problems += [f"{where}: {found}" for where, other in given
                         if (found := _store_problem(store, other)) is not None]
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    tree_hash = store.tree_hash.name
    signed = [(str(path), cp), *given]
    forks = [str(fork) for i, (_, a) in enumerate(signed) for _, b in signed[i + 1:]
             if (fork := detect_fork(a, b)) is not None]
    ruled, rule_lines, rule_doc = rules.check([c for _, c in signed])
    ok = result.ok and not problems and not forks and not ruled
    head = result.head_hash.hex() if result.head_hash is not None else None
    doc = {"ok": ok, "checkpoint_size": result.checkpoint_size,
           "checked": result.checked, "entries": result.entries, "head_hash": head,
           "merkle_root": result.root.hex() if result.root else None,
           "first_bad_seq": result.first_bad_seq, "problem": result.problem,
           "checkpoints": [_checkpoint_doc(w, c, tree_hash) for w, c in signed],
           "checkpoint_problems": problems + ruled, "forks": forks, **rule_doc}
    if result.ok:
        lines = [f"OK: {result.checked} new entries after the checkpoint of tree size "
                 f"{result.checkpoint_size}; {result.entries} entries, head "
                 f"{head or 'none (empty ledger)'}"]
        if given and not problems:
            lines.append(f"OK: agrees with {len(given)} more signed checkpoint(s)")
        lines += [*(f"FAIL: {p}" for p in problems), *rule_lines,
                  *(f"FAIL: {p}" for p in ruled)]
    else:
        lines = [f"FAIL at seq {result.first_bad_seq}: {result.problem}"]
    lines += [f"FAIL: {f}" for f in forks]
    return Verdict(ok, doc, lines)


def verify_export_file(path: Path, log_vkey: list[str] | None, files: list[Path],
                       since: Path | None, rules: Rules) -> Verdict:
    """Verify an export file as `ledger verify FILE` does (usage errors exit 2)."""
    from ledger.export import read_export, verify_export

    if (files or since is not None) and not log_vkey:
        fail("--checkpoint and --since-checkpoint need the log's key: pass --log-key",
             EXIT_USAGE)
    log = None
    if log_vkey:
        pinned = log_keys(log_vkey, "")
        try:
            contents = read_export(path)
            log = LogKeyHistory.from_entries(pinned, contents.entries, contents.checkpoints,
                                             follow_chain=True)
        except RootChainError as exc:
            problem = f"log-key history: {exc}"
            return Verdict(False, {"ok": False, "problem": problem}, [f"FAIL: {problem}"])
        except LedgerError:  # not an export: verify_export says why
            log = LogKeyHistory(pinned)
    named = [*files, *([since] if since is not None else [])]
    given = [_read_checkpoint(f, log, rules.witnesses) for f in named] if log else []
    try:
        result = verify_export(path, log, rules.witnesses, given)
    except LedgerError as exc:
        fail(str(exc), EXIT_DAMAGED if path.exists() else EXIT_USAGE)
    signed = [*result.checkpoints, *result.given]
    ruled, rule_lines, rule_doc = (rules.check(signed) if log is not None
                                   else ([], [], {"witnessed": None}))
    ok = result.ok and not ruled
    head = result.head_hash.hex() if result.head_hash is not None else None
    doc = {"ok": ok, "entries": result.entries, "head_hash": head,
           "merkle_hash": result.merkle_hash,
           "merkle_root": result.root.hex() if result.root else None,
           "checkpoints": [cp.checkpoint.size for cp in result.checkpoints],
           "given_checkpoints": [cp.checkpoint.size for cp in result.given],
           "legacy_tree_hash": result.legacy_tree_hash,
           "signatures_checked": result.signatures_checked,
           "first_bad_seq": result.first_bad_seq,
           "problem": result.problem or (ruled[0] if ruled else None), "file": str(path),
           **rule_doc}
    if result.ok:
        lines = [f"OK: {result.entries} entries, head {head or 'none (empty ledger)'}"]
        if result.checkpoints:
            note = "" if result.signatures_checked else " (signatures NOT checked: no --log-key)"
            lines.append(f"OK: {len(result.checkpoints)} checkpoint(s) agree with the "
                         f"entries{note}")
        if result.given:
            lines.append(f"OK: agrees with {len(result.given)} given signed checkpoint(s)")
        if since is not None:
            lines.append(f"note: an export is read whole: all {result.entries} entries "
                         "were checked, not only those after --since-checkpoint")
        lines += [*rule_lines, *(f"FAIL: {p}" for p in ruled)]
    elif result.first_bad_seq is not None:
        lines = [f"FAIL at seq {result.first_bad_seq}: {result.problem}"]
    else:
        lines = [f"FAIL: {result.problem}"]
    return Verdict(ok, doc, lines)


# ---------------------------------------------------------------- export, bundles


def export(
    out: Path = typer.Argument(..., help="The file to write.", metavar="OUT"),
    db: str | None = DB,
    home: Path | None = HOME,
) -> None:
    """Write the whole ledger and its signed checkpoints to one portable file.

    The file is framed canonical msgpack (docs/PROTOCOL.md, "Export file"); anyone can
    check it offline with `ledger verify OUT --log-key VKEY`.
    """
    from ledger.storage.export import write_export

    store = open_store(need_db(db, home))
    try:
        entries, cps = write_export(store, out)
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    typer.echo(f"wrote {out}: {entries} entries, {cps} checkpoint(s)")


def verify_bundle_cmd(
    file: Path = typer.Argument(..., help="A proof bundle from `ledger prove --out`."),
    log_vkey: list[str] = typer.Option(..., "--log-key", help=LOG_KEY_HELP + " Repeatable "
                                       "(any of them may have signed).", metavar="VKEY"),
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
    logs = log_keys(log_vkey, "verify-bundle")
    witnesses = witness_keys(witness)
    try:
        data = file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {file}: {exc}", EXIT_USAGE)
    try:
        report = _verify_bundle_any(data, logs, witnesses, min_witnesses)
    except LedgerError as exc:
        if as_json:
            print_json({"ok": False, "problem": str(exc)})
        else:
            typer.echo(f"FAIL: {exc}")
        raise typer.Exit(EXIT_DAMAGED) from None
    e, cp = report.entry, report.checkpoint.checkpoint
    if as_json:
        print_json({
            "ok": True, "seq": e.seq, "kind": e.kind, "actor": e.actor, "subject": e.subject,
            "hash": e.hash.hex(), "tree_size": cp.size, "root": cp.root.hex(),
            "origin": cp.origin, "witnesses": report.witnesses,
            "merkle_hash": report.merkle_hash})
        return
    typer.echo(f"OK: entry seq {e.seq} ({e.kind}, actor {e.actor}, subject {e.subject}) is in "
               f"{cp.origin} at tree size {cp.size}, root {b64encode(cp.root)}")
    typer.echo(f"    cosigned by: {', '.join(report.witnesses) or 'no listed witness'}")


def checkpoint_cmd(
    db: str | None = DB,
    home: Path | None = HOME,
    size: int | None = typer.Option(None, "--size", min=0, help="Tree size; default: latest."),
    out: Path | None = typer.Option(None, "--out", help="Write the note to this file."),
) -> None:
    """Print a signed checkpoint stored in the ledger (the hub's), with its cosignatures:
    the note to keep for `ledger verify --checkpoint` / `--since-checkpoint`."""
    store = open_store(need_db(db, home))
    from ledger.storage.checkpoint_store import CheckpointStore

    try:
        cps = CheckpointStore(store, create=False)
        found = cps.latest() if size is None else cps.get(size)
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    if found is None:
        fail("no such checkpoint in this ledger" if size is not None
              else "this ledger holds no signed checkpoint yet", EXIT_USAGE)
    note = found.full_note()
    if out is None:
        typer.echo(note.decode(), nl=False)
        return
    out.write_bytes(note)
    typer.echo(f"wrote {out}: checkpoint of tree size {found.size}")


def _verify_bundle_any(data: bytes, logs: list[Any], witnesses: list[CosignatureVerifier],
                       min_witnesses: int | None) -> Any:
    """`verify_bundle` with the first of `logs` that signed the bundle's checkpoint."""
    from ledger.bundle import verify_bundle
    from ledger.errors import BundleError

    errors = []
    for log in logs:
        try:
            return verify_bundle(data, log, witnesses, min_witnesses)
        except BundleError as exc:
            errors.append(str(exc))
    raise BundleError("; ".join(dict.fromkeys(errors)))
