"""The `ledger` command, run as a real subprocess the way an auditor runs it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.storage.store import LedgerStore
from ledger.verify import ENTRY_EDITED

TS = 1_700_000_000_000_000_000


def run_ledger(*args: str, env: dict[str, str] | None = None,
               columns: str | None = None) -> subprocess.CompletedProcess[str]:
    child = {k: v for k, v in os.environ.items()
             if k not in ("LEDGER_DB", "FLEET_HUB_HOME", "COLUMNS")}
    child.update(env or {})
    if columns is not None:
        child["COLUMNS"] = columns
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=child,
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


# -------------------------------------------------- which ledger: --db, --home, LEDGER_DB


def hub_home_with(tmp_path: Path, database: str) -> Path:
    """A directory with the config.toml `hub init` writes (only what `ledger` reads)."""
    home = tmp_path / "hub-home"
    home.mkdir()
    (home / "config.toml").write_text(f'nats_url = "nats://127.0.0.1:4222"\n'
                                      f'database = "{database}"\n')
    return home


def test_home_reads_the_database_from_config_toml(tmp_path: Path, ledger_db: Path) -> None:
    by_db = run_ledger("verify", "--db", str(ledger_db))
    relative = hub_home_with(tmp_path, "ledger.db")
    (relative / "ledger.db").write_bytes(ledger_db.read_bytes())
    by_home = run_ledger("verify", "--home", str(relative))
    assert by_home.returncode == 0, by_home.stderr
    assert by_home.stdout == by_db.stdout
    absolute = tmp_path / "other"
    absolute.mkdir()
    home = hub_home_with(absolute, str(ledger_db))  # an absolute path is taken as it is
    shown = run_ledger("show", "--home", str(home), "--json", "-n", "1")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)[0]["seq"] == 9


def test_ledger_db_environment_variable(ledger_db: Path) -> None:
    done = run_ledger("verify", env={"LEDGER_DB": str(ledger_db)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: 10 entries")
    # --db wins over the environment.
    other = run_ledger("root", "--db", str(ledger_db), env={"LEDGER_DB": "/nonexistent.db"})
    assert other.returncode == 0, other.stderr


@pytest.mark.parametrize("args", [
    ("verify",), ("show",), ("query", "--kind", "x"), ("export", "out.export"),
    ("checkpoint",), ("root",), ("prove", "--seq", "0"), ("tail",),
])
def test_no_database_named_is_a_usage_error(args: tuple[str, ...]) -> None:
    done = run_ledger(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error:") and "--home" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_home_errors_are_usage_errors(tmp_path: Path, ledger_db: Path) -> None:
    not_home = run_ledger("verify", "--home", str(tmp_path))
    assert not_home.returncode == 2
    assert "config.toml not found" in not_home.stderr and "hub init" in not_home.stderr
    both = run_ledger("verify", "--db", str(ledger_db), "--home", str(tmp_path))
    assert both.returncode == 2 and "not both" in both.stderr


# ---------------------------------------------------------------- conventions


def test_version_and_short_help() -> None:
    from importlib.metadata import version

    done = run_ledger("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"ledger (fleetledger) {version('fleetledger')}"
    assert run_ledger("-h").stdout == run_ledger("--help").stdout
    short = run_ledger("verify", "-h")
    assert short.returncode == 0 and "Examples:" in short.stdout
    assert "--install-completion" in run_ledger("--help").stdout


def test_80_columns_keep_every_seq_and_hash(tmp_path: Path) -> None:
    """A long actor and subject fold; seq and the hash prefix are never cut or dropped."""
    path = tmp_path / "wide.db"
    actor = "158e364f48b70b4c5f7c8449e656504b"
    with LedgerStore.open(path) as store:
        for i in range(12):
            store.append("model.registered", actor, f"model:keyword-spotting-large/{i}",
                         {"i": i}, ts=TS + i)
        hashes = [e.hash.hex()[:12] for e in store.tail(12)]
    for command in ("show", "query"):
        done = run_ledger(command, "--db", str(path), columns="80")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, done.stdout
        first_cells = [line.split()[0] for line in lines if line.strip()]
        assert {str(i) for i in range(12)} <= set(first_cells), done.stdout
        for digest in hashes:
            assert digest in done.stdout, (command, digest, done.stdout)
