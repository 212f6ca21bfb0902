"""The `ledger` command, run as a real subprocess the way an auditor runs it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.storage.store import LedgerStore
from ledger.verify import ENTRY_EDITED

TS = 1_700_000_000_000_000_000


def run_ledger(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def ledger_db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path) as store:
        for i in range(10):
            store.append("device.status", "dev-7", "device:dev-7", {"i": i, "v": "ok"}, ts=TS + i)
    return path


def tamper_payload(path: Path, seq: int) -> None:
    raw = sqlite3.connect(path)
    try:
        raw.execute("DROP TRIGGER ledger_entries_no_update")
        (body,) = raw.execute("SELECT body FROM ledger_entries WHERE seq = ?", (seq,)).fetchone()
        edited = body.replace(b"ok", b"no")
        assert edited != body
        raw.execute("UPDATE ledger_entries SET body = ? WHERE seq = ?", (edited, seq))
        raw.commit()
    finally:
        raw.close()


def test_verify_ok(ledger_db: Path) -> None:
    with LedgerStore.open(ledger_db) as store:
        head = store.head()
    assert head is not None
    done = run_ledger("verify", "--db", str(ledger_db))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"OK: 10 entries, head {head.hash.hex()}"


def test_verify_names_the_edited_entry(ledger_db: Path) -> None:
    tamper_payload(ledger_db, 7)
    done = run_ledger("verify", "--db", str(ledger_db))
    assert done.returncode == 1
    assert done.stdout.strip() == f"FAIL at seq 7: {ENTRY_EDITED}"
    assert "Traceback" not in done.stderr


def test_verify_json(ledger_db: Path) -> None:
    tamper_payload(ledger_db, 2)
    done = run_ledger("verify", "--db", str(ledger_db), "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["first_bad_seq"] == 2
    assert report["entries"] == 2 and report["problem"] == ENTRY_EDITED


def test_verify_reports_a_deleted_entry(ledger_db: Path) -> None:
    raw = sqlite3.connect(ledger_db)
    raw.execute("DROP TRIGGER ledger_entries_no_delete")
    raw.execute("DELETE FROM ledger_entries WHERE seq = 4")
    raw.commit()
    raw.close()
    done = run_ledger("verify", "--db", str(ledger_db))
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL at seq 4: missing entry")


def test_verify_missing_database_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    done = run_ledger("verify", "--db", str(missing))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no ledger database at {missing} (check the --db path)"
    ]
    assert not missing.exists()


def test_verify_a_file_that_is_not_a_ledger(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("hello")
    done = run_ledger("verify", "--db", str(junk))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_show_table_and_json(ledger_db: Path) -> None:
    done = run_ledger("show", "--db", str(ledger_db), "--last", "3")
    assert done.returncode == 0, done.stderr
    assert "device.status" in done.stdout and "2023-11-14T22:13:20" in done.stdout
    first_cells = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert {"7", "8", "9"} <= set(first_cells) and "6" not in first_cells
    as_json = run_ledger("show", "--db", str(ledger_db), "--last", "2", "--json")
    rows = json.loads(as_json.stdout)
    assert [r["seq"] for r in rows] == [8, 9]
    assert rows[1]["payload"] == {"i": 9, "v": "ok"}
    assert rows[1]["prev"] == rows[0]["hash"]


def test_help_teaches(ledger_db: Path) -> None:
    top = run_ledger("--help")
    assert top.returncode == 0 and "hash-chained" in top.stdout
    assert "verify" in top.stdout and "show" in top.stdout
    sub = run_ledger("verify", "--help")
    assert "FAIL at seq" in sub.stdout and "exit 2" in sub.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "ledger"
    # scripts/setup installs the package, so a missing script is a packaging bug.
    assert script.exists(), f"no `ledger` console script next to {sys.executable}"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0
