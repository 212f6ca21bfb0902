"""`ledger report`: the HTML audit report (the logic is ledger/report/)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from ledger.cli._common import (
    DB,
    EXIT_DAMAGED,
    EXIT_OK,
    EXIT_USAGE,
    HOME,
    LOG_KEYS_HELP,
    WITNESS_KEY_HELP,
    fail,
    ledger_db,
    open_store,
    parse_time,
)
from ledger.cli.audit import rules_of, verify_db, verify_export_file
from ledger.errors import LedgerError


def report(
    out: Path = typer.Option(..., "--out", metavar="FILE", help="The HTML file to write."),
    db: str | None = DB,
    home: Path | None = HOME,
    export: Path | None = typer.Option(None, "--export", metavar="FILE", help="Read an "
                                       "export file (`ledger export`) instead of a database."),
    log_vkey: list[str] | None = typer.Option(
        None, "--log-key", help=LOG_KEYS_HELP + " Without it, checkpoint signatures are not "
        "checked.", metavar="VKEY"),
    witness: list[str] | None = typer.Option(None, "--witness-key", help=WITNESS_KEY_HELP,
                                             metavar="VKEY"),
    allow_no_checkpoint: bool = typer.Option(
        False, "--allow-no-checkpoint", help="With --log-key, accept a ledger no signed "
        "checkpoint covers (as `ledger verify` does)."),
    devices: list[str] | None = typer.Option(None, "--device", metavar="ID", help="A device "
                                             "whose history to show (repeatable)."),
    since: str | None = typer.Option(None, "--from", metavar="TIME", help="Start of the "
                                     "device history: ISO 8601, integer ns or `now`. "
                                     "Default: the beginning."),
    until: str | None = typer.Option(None, "--to", metavar="TIME", help="End of the device "
                                     "history (default: now)."),
) -> None:
    """Write one self-contained HTML audit report: the `ledger verify` verdict (chain,
    tree, checkpoints, cosignatures), the model versions with lineage, approvals (by
    name, signatures checked), validation numbers and policy, releases, rollouts (waves,
    gate evidence as charts, every decision), each --device's history over --from/--to
    (what ran when, as `ledger at` answers), and an appendix of every entry cited with
    its seq and hash.

    The file has no script and loads nothing: it opens from disk and prints. Every
    value from the ledger is HTML-escaped. Exit 0 when it is written and the ledger
    verified; 1 when it is written but verification found damage or a signature check
    failed (the report says so at the top); 2 on usage errors."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ledger.report import gather, render_report
    from ledger.report.data import Verification
    from ledger.storage.at import ExportSource, Source, StoreSource

    # Three steps a person waits for on a large ledger (about a minute at 1,000,000
    # entries: docs/BENCHMARKS.md): shown on stderr when it is a terminal, else silent.
    err = Console(stderr=True)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
                        TimeElapsedColumn(), console=err, transient=True,
                        disable=not err.is_terminal)
    steps = progress.add_task("verifying the ledger", total=3)

    def step(description: str) -> None:
        progress.update(steps, advance=1, description=description)

    rules = rules_of(log_vkey, witness, None, allow_no_checkpoint)
    now = time.time_ns()
    start = parse_time(since, "--from") or 0
    end = parse_time(until, "--to") or now
    if end < start:
        fail("--to is before --from", EXIT_USAGE)
    store: Any = None
    found = None
    if export is not None:
        if db is not None or home is not None:
            fail("give --export or --db/--home, not both", EXIT_USAGE)
    else:
        found = ledger_db(db, home)
        if found is None:
            fail("which ledger? give --db PATH, --home DIR or --export FILE (or set "
                 "LEDGER_DB)", EXIT_USAGE)
    progress.start()  # after the usage checks: a usage error leaves no display behind
    if export is not None:
        verdict = verify_export_file(export, log_vkey, [], None, rules)
        where = str(export)
    else:
        assert found is not None
        verdict = verify_db(found, [], log_vkey, rules, None)
        where = found
    verification = Verification(verdict.ok, verdict.lines, verdict.doc)
    step("gathering models, rollouts and device history")
    try:
        source: Source
        if export is not None:
            source = ExportSource(export)
        else:
            store = open_store(where)
            source = StoreSource(store)
        data = gather(source, verification, where, devices or [], start, end, now)
    except LedgerError as exc:
        # A ledger too damaged to read still gets a report: the verdict, and why.
        from ledger.report.data import ReportData

        data = ReportData(where, "", verification, problem=f"the entries cannot be read: {exc}")
    finally:
        if store is not None:
            store.close()
    step("writing the HTML")
    try:
        out.write_text(render_report(data), encoding="utf-8")
    except OSError as exc:
        progress.stop()
        fail(f"cannot write {out}: {exc}", EXIT_USAGE)
    progress.stop()
    damaged = not verdict.ok or bool(data.failed_checks) or bool(data.problem)
    first = verdict.lines[0] if verdict.lines else ""
    typer.echo(f"wrote {out}: {'FAIL' if damaged else 'PASS'}: {first}")
    for check in data.failed_checks:
        typer.echo(f"FAIL: {check.what} ({check.signer}): {check.problem}")
    raise typer.Exit(EXIT_DAMAGED if damaged else EXIT_OK)
