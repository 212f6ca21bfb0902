"""`ledger at`: the auditor's question in one command (the logic is ledger/storage/at.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ledger.cli._common import (
    DB,
    EXIT_DAMAGED,
    EXIT_USAGE,
    HOME,
    LOG_KEY_HELP,
    fail,
    ledger_db,
    log_key,
    open_store,
    parse_time,
    print_json,
    rfc3339,
)
from ledger.entry import Entry
from ledger.errors import LedgerError


def at(
    device: str = typer.Option(..., "--device", help="The device id."),
    when: str = typer.Option(..., "--time", help="The time: ISO 8601 (UTC unless it says "
                             "otherwise), integer nanoseconds, or `now`. Compared with the "
                             "ledger's time of each entry."),
    db: str | None = DB,
    home: Path | None = HOME,
    export: Path | None = typer.Option(None, "--export", metavar="FILE", help="Read an "
                                       "export file (`ledger export`) instead of a database."),
    out: Path | None = typer.Option(None, "--out", metavar="DIR", help="Write a proof bundle "
                                    "of every entry of the answer here (needs a checkpoint "
                                    "covering them); `ledger verify-bundle` checks each."),
    log_vkey: str | None = typer.Option(None, "--log-key", help=LOG_KEY_HELP + " With it, "
                                        "the export's checkpoints and the written bundles "
                                        "are checked too.", metavar="VKEY"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object "
                                 "(docs/CLI-JSON.md)."),
) -> None:
    """Which model ran on a device at a time, who registered and approved it, and with
    what validation numbers: the release the device last reported `applied` at or before
    the time, the assignment and rollout it came from, the operators (by name) behind
    each step, the release's manifest hash, its validation metrics and policy.

    Every operator signature is checked against the key the ledger recorded for that
    operator, and the device's own signed report against its enrolled key. Exit 0 with
    an answer; 1 when nothing ran on the device at that time, when a signature check
    fails (named), or when the bundles cannot be made; 2 on usage errors."""
    from ledger.storage.at import Source, StoreSource, answer_at

    t_ns = parse_time(when, "--time")
    assert t_ns is not None
    log = log_key(log_vkey, "") if log_vkey is not None else None
    source: Source
    store = None
    if export is not None:
        if db is not None or home is not None:
            fail("give --export or --db/--home, not both", EXIT_USAGE)
        source = _export_source(export, log)
    else:
        found = ledger_db(db, home)
        if found is None:
            fail("which ledger? give --db PATH, --home DIR or --export FILE (or set "
                 "LEDGER_DB)", EXIT_USAGE)
        store = open_store(found)
        source = StoreSource(store)
    try:
        answer = answer_at(source, device, t_ns)
        bundles = _write_bundles(source, answer.entries(), out, log) if (
            out is not None and answer.applied is not None) else []
    except LedgerError as exc:
        fail(str(exc), EXIT_DAMAGED)
    finally:
        if store is not None:
            store.close()
    doc = _json(answer, bundles)
    if as_json:
        print_json(doc, indent=2)
    else:
        _print(doc)
    if answer.applied is None or answer.failed:
        raise typer.Exit(EXIT_DAMAGED)


def _export_source(path: Path, log: Any) -> Any:
    from ledger.export import verify_export
    from ledger.storage.at import ExportSource

    try:
        result = verify_export(path, log)
        if not result.ok:
            where = f" at seq {result.first_bad_seq}" if result.first_bad_seq is not None else ""
            fail(f"the export is damaged{where}: {result.problem}", EXIT_DAMAGED)
        return ExportSource(path)
    except LedgerError as exc:
        fail(f"{path}: {exc}", EXIT_USAGE)


def _write_bundles(source: Any, entries: list[Entry], out: Path, log: Any) -> list[str]:
    from ledger.bundle import verify_bundle
    from ledger.durable import atomic_write

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create {out}: {exc}", EXIT_USAGE)
    written = []
    for e in entries:
        data = source.bundle(e.seq)
        if log is not None:
            verify_bundle(data, log)
        path = out / f"seq-{e.seq}-{e.kind}.bundle"
        try:
            atomic_write(path, [data], 0o644)
        except OSError as exc:
            fail(f"cannot write {path}: {exc}", EXIT_USAGE)
        written.append(str(path))
    return written


_time = rfc3339


def _when(e: Entry | None) -> dict[str, Any] | None:
    return None if e is None else {"seq": e.seq, "ts": e.ts, "time": _time(e.ts)}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _json(answer: Any, bundles: list[str]) -> dict[str, Any]:
    """The documented shape (docs/CLI-JSON.md, `ledger at`)."""
    checks = {c.what: c for c in answer.checks}

    def signature(e: Entry) -> str:
        c = checks.get(f"{e.kind} seq {e.seq}")
        return "unchecked" if c is None else "valid" if c.ok else "INVALID"

    def step(e: Entry | None, *fields: str) -> dict[str, Any] | None:
        if e is None:
            return None
        return {**(_when(e) or {}), "by": answer.name_of(e.actor), "keyid": e.actor,
                "signature": signature(e), **{f: _plain(e.payload.get(f)) for f in fields}}

    a = answer.applied
    doc: dict[str, Any] = {"device": answer.device, "at": _time(answer.t_ns), "at_ts": answer.t_ns,
                           "found": a is not None}
    if a is None:
        return doc
    p = a.payload
    later = answer.later
    assignment = answer.assignment
    doc.update({
        "model": p.get("model"), "version": p.get("version"), "digest": p.get("digest"),
        "manifest_hash": answer.released.payload.get("manifest_hash") if answer.released
        else None,
        "applied": {**(_when(a) or {}), "counter": p.get("counter"), "boot": p.get("boot"),
                    "report_seq": p.get("report_seq"), "signature": signature(a)},
        "changed_later": None if later is None else {
            **(_when(later) or {}), "kind": later.kind, "model": later.payload.get("model"),
            "version": later.payload.get("version")},
        "assignment": None if assignment is None else {
            **(_when(assignment) or {}), "counter": assignment.payload.get("counter"),
            "deployment": assignment.payload.get("deployment"),
            "rollout": answer.rollout_id or None},
        "rollout": None if answer.rollout is None else {
            "id": answer.rollout_id, **(step(answer.rollout, "target", "waves") or {})},
        "registered": step(answer.registered),
        "validated": step(answer.validated, "passed", "metrics", "policy", "failures",
                          "dataset_digest"),
        "approvals": [step(e) for e in answer.approvals],
        "approvals_required": answer.validated.payload.get("approvals_required")
        if answer.validated else None,
        "released": step(answer.released, "manifest_hash", "expires"),
        "checks": [{"what": c.what, "signer": c.signer, "ok": c.ok, "problem": c.problem or None}
                   for c in answer.checks],
        "bundles": bundles,
    })
    return doc


def _print(doc: dict[str, Any]) -> None:
    echo = typer.echo
    if not doc["found"]:
        echo(f"nothing ran on {doc['device']} at {doc['at']}: no `applied` report in the "
             "ledger at or before that time")
        return
    a = doc["applied"]
    echo(f"{doc['model']}/{doc['version']} ran on {doc['device']} at {doc['at']}")
    echo(f"  reported applied  seq {a['seq']} at {a['time']} (counter {a['counter']}, "
         f"device signature {a['signature']})")
    later = doc["changed_later"]
    echo("  since then        " + ("no later report changed it" if later is None else
         f"{later['kind']} {later['model']}/{later['version']} at {later['time']} "
         f"(seq {later['seq']})"))
    asg = doc["assignment"]
    if asg is not None:
        echo(f"  assignment        seq {asg['seq']} at {asg['time']}: counter "
             f"{asg['counter']}, deployment {asg['deployment'] or '-'}, rollout "
             f"{asg['rollout'] or '-'}")
    if doc["rollout"] is not None:
        r = doc["rollout"]
        echo(f"  rollout           {r['id']} created by {r['by']} (seq {r['seq']}, "
             f"signature {r['signature']})")
    for label, step in (("registered", doc["registered"]), ("validated", doc["validated"]),
                        *(("approved", s) for s in doc["approvals"]),
                        ("released", doc["released"])):
        if step is not None:
            echo(f"  {label:<17} by {step['by']} at {step['time']} (seq {step['seq']}, "
                 f"signature {step['signature']})")
    echo(f"  digest            {doc['digest']}")
    echo(f"  manifest hash     {doc['manifest_hash'] or '-'}")
    v = doc["validated"]
    if v is not None:
        metrics = ", ".join(f"{k}={val:.6g}" if isinstance(val, float) else f"{k}={val}"
                            for k, val in sorted((v["metrics"] or {}).items()))
        echo(f"  validation        {'passed' if v['passed'] else 'FAILED'}: {metrics or '-'}")
        echo(f"  policy            {json.dumps(v['policy'], sort_keys=True)}; approvals "
             f"{len(doc['approvals'])} of {doc['approvals_required']} required")
    for c in doc["checks"]:
        if not c["ok"]:
            echo(f"FAIL: {c['what']} ({c['signer']}): {c['problem']}")
    for path in doc["bundles"]:
        echo(f"  bundle            {path}")
