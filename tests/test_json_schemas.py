"""Every `--json` document has a schema (docs/schemas/, docs/CLI-JSON.md), and the
schemas are checked where the documents are made.

The check itself is not here: tests/conftest.py sets FLEET_CHECK_JSON_SCHEMAS=1 for the
whole run, so every test that runs a command with `--json` (in-process or as a
subprocess) has its document validated by the CLI before it is printed
(ledger/json_output.py); a mismatch exits 70 and that test fails. Here: the schema files
and the commands match one to one, the schemas are valid and documented, and one test
on a real hub runs the commands no other test runs with `--json`, so every schema is
exercised by some test.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from edge_agent import cli as agent_cli
from hub import cli as hub_cli
from ledger import cli as ledger_cli
from ledger import json_output
from tests.fleet import Fleet

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = json_output.SCHEMA_DIR
APPS = {"hub": hub_cli.app, "ledger": ledger_cli.app, "edge-agent": agent_cli.app}


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command under a click command, with its path of names (as tests/test_cli.py
    walks them)."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


def json_commands() -> dict[Path, str]:
    """schema file -> `TOOL WORDS...` for every command that takes --json."""
    found = {}
    for tool, app in APPS.items():
        for path, command in _commands(typer.main.get_command(app)):
            if any("--json" in p.opts for p in getattr(command, "params", [])):
                found[json_output.schema_path(tool, path)] = " ".join((tool, *path))
    return found


COMMANDS = json_commands()
SCHEMA_FILES = sorted(SCHEMAS.glob("*/*.schema.json"))


@pytest.mark.timeout(60)
def test_every_command_with_json_has_a_schema() -> None:
    missing = {cmd: str(p.relative_to(REPO_ROOT)) for p, cmd in COMMANDS.items()
               if not p.is_file()}
    assert not missing, (
        "these commands take --json but have no schema; write one (draft 2020-12, "
        "docs/CLI-JSON.md says how) and link it from docs/CLI-JSON.md:\n"
        + "\n".join(f"  {cmd}: {path}" for cmd, path in sorted(missing.items())))


@pytest.mark.timeout(60)
def test_every_schema_names_a_command_with_json() -> None:
    stray = [str(p.relative_to(REPO_ROOT)) for p in SCHEMA_FILES if p not in COMMANDS]
    assert not stray, f"schemas for no command that takes --json: {stray}"


@pytest.mark.timeout(60)
def test_the_walk_finds_the_json_commands() -> None:
    assert {"hub device show", "hub status", "ledger at", "ledger query",
            "edge-agent status"} <= set(COMMANDS.values())
    assert len(COMMANDS) >= 50


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", [*SCHEMA_FILES, SCHEMAS / "defs.schema.json"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_schema_is_valid_and_open_to_new_fields(path: Path) -> None:
    from jsonschema import Draft202012Validator

    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == json_output.SCHEMA_BASE + str(path.relative_to(SCHEMAS))
    if path.name == "defs.schema.json":
        return
    assert schema.get("title") and schema.get("description"), path
    # Fields may be added in any release (docs/CLI-JSON.md): no schema closes an object.
    assert '"additionalProperties": false' not in path.read_text(), path


@pytest.mark.timeout(60)
def test_the_docs_link_every_schema() -> None:
    doc = (REPO_ROOT / "docs" / "CLI-JSON.md").read_text()
    linked = set(re.findall(r"\]\((schemas/[^)]+\.schema\.json)\)", doc))
    want = {str(p.relative_to(SCHEMAS.parent))
            for p in [*SCHEMA_FILES, SCHEMAS / "defs.schema.json"]}
    assert want - linked == set(), f"not linked from docs/CLI-JSON.md: {sorted(want - linked)}"
    assert linked - want == set(), f"docs/CLI-JSON.md links missing files: {linked - want}"


# ---------------------------------------------------------------- the check itself


@pytest.mark.timeout(60)
def test_a_document_that_breaks_its_schema_exits_70_naming_the_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        json_output.check("hub", ("whoami",), {"name": "admin", "keyid": "not hex",
                                               "roles": ["admin"]})
    assert done.value.code == json_output.EXIT_SCHEMA == 70
    message = capsys.readouterr().err
    assert message.startswith("error: `hub whoami --json` does not match "
                              "docs/schemas/hub/whoami.schema.json")
    assert "at keyid:" in message and "'not hex' does not match" in message


@pytest.mark.timeout(60)
def test_a_command_without_a_schema_exits_70_naming_the_file_to_write(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        json_output.check("hub", ("device", "frobnicate"), {"token": "x"})
    assert done.value.code == 70
    message = capsys.readouterr().err
    assert "`hub device frobnicate --json` has no schema" in message
    assert str(SCHEMAS / "hub" / "device-frobnicate.schema.json") in message


@pytest.mark.timeout(60)
def test_without_the_variable_nothing_is_checked_and_jsonschema_is_not_imported() -> None:
    """Production: a document is printed as it is, and jsonschema (a dev dependency)
    is never imported."""
    import subprocess
    import sys

    probe = ("import sys; from ledger.json_output import emit; "
             "emit('hub', {'no': 'schema'}); "
             "print('jsonschema' in sys.modules, 'referencing' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != json_output.CHECK_ENV}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['{"no": "schema"}', "False False"]


# ---------------------------------------------------------------- every schema exercised

# Schemas exercised by other tests (with FLEET_CHECK_JSON_SCHEMAS=1 from conftest): the
# command and a test file that runs it with --json. test_the_exercise_covers_every_schema
# checks that the two lists together cover every schema, and that each file named here
# does pass --json and the command's words.
EXERCISED_ELSEWHERE = {
    "hub context list": "tests/test_contexts.py",
    "hub deploy": "tests/test_device_lifecycle.py",
    "hub keys show": "tests/test_key_rotation.py",
    "hub keys root prepare": "tests/test_offline_root.py",
    "hub keys root sign": "tests/test_offline_root.py",
    "hub keys root import": "tests/test_offline_root.py",
    "hub keys root keygen": "tests/test_offline_root.py",
    "hub policy show": "tests/test_release.py",
    "hub witness list": "tests/test_transparency.py",
    "hub telemetry": "tests/test_telemetry_paging.py",
    "ledger at": "tests/test_ledger_report.py",
    "ledger prove": "tests/test_ledger_merkle_store.py",
    "ledger query": "tests/test_ledger_audit.py",
    "ledger root": "tests/test_ledger_merkle_store.py",
    "ledger tail": "tests/test_ledger_witness_nats.py",
    "ledger verify": "tests/test_ledger_report.py",
    "edge-agent predict": "tests/test_inference_api.py",
    "edge-agent status": "tests/test_agent_supervised.py",
    "edge-agent keygen": "tests/test_device_tokens.py",
    "edge-agent enroll": "tests/test_device_tokens.py",
    "hub device token create": "tests/test_device_tokens.py",
    "hub model rebase": "tests/test_drift.py",
    "hub model validation": "tests/test_validation_jobs.py",
    "hub site add": "tests/test_nats_cluster.py",
}


def _exercised(log: Path, start: int) -> set[str]:
    return set(log.read_text()[start:].splitlines())


@pytest.mark.timeout(400)
async def test_a_real_hub_answers_every_json_command_in_its_schema(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    """The commands no other test runs with --json, on a real hub with an agent, each as
    an operator types it: every document passes its schema (the CLI checks it, exit 70
    otherwise) and lands in the exercised log."""
    import asyncio

    from typer.testing import CliRunner

    from testkit.modelgen import write_validation_set

    log = Path(os.environ[json_output.LOG_ENV])
    start = len(log.read_text())
    home = str(fleet.config.home)
    approver = tmp_path / "approver.key"
    fleet.approver_key.save(approver)

    async def cli(tool: str, *args: str, code: int = 0, key: Path | None = None) -> Any:
        extra = ["--home", home] if tool == "hub" and args[0] != "context" else []
        extra += ["--key", str(key)] if key else []
        result = await asyncio.to_thread(
            CliRunner().invoke, APPS[tool], [*args, *extra, "--json"], prog_name=tool,
            env={"COLUMNS": "200"})
        assert result.exit_code == code, (args, result.exit_code, result.output)
        if args[0] == "tail":  # one document a line
            return [json.loads(line) for line in result.stdout.splitlines()]
        return json.loads(result.stdout)

    # The model lifecycle, kws/1 all the way, kws/2 rejected, kws/3 released and revoked.
    for version in ("1", "2", "3"):
        await cli("hub", "model", "register", str(model_files[version]), f"kws/{version}")
        data = write_validation_set(model_files[version], tmp_path / f"v{version}.npz")
        await cli("hub", "model", "validate", f"kws/{version}", "--data", str(data))
    await cli("hub", "model", "approve", "kws/1", key=approver)
    await cli("hub", "model", "reject", "kws/2", "--reason", "noisy", key=approver)
    await cli("hub", "model", "release", "kws/1")
    await cli("hub", "model", "approve", "kws/3", key=approver)
    await cli("hub", "model", "release", "kws/3")
    for command in (("model", "list"), ("model", "show", "kws"), ("model", "history", "kws"),
                    ("policy", "show", "kws"), ("operator", "list"), ("whoami",)):
        await cli("hub", *command)
    await cli("hub", "operator", "add", "bob", "--role", "operator",
              "--out", str(tmp_path / "bob.key"))

    # A device with a running agent, in a group, deployed to.
    await cli("hub", "device", "enroll", "dev-0")
    await cli("hub", "device", "tag", "dev-0", "--group", "lab", "--tag", "site=a")
    fleet.agent("dev-0").start()
    summary = await cli("hub", "deploy", "kws/1", "--device", "dev-0", "--wait",
                        "--wait-timeout", "90", "--interval", "0.2")
    assert summary["counts"]["applied"] == 1
    for command in (("device", "show", "dev-0"), ("device", "history", "dev-0"),
                    ("devices",), ("status",), ("telemetry",),
                    ("telemetry", "--device", "dev-0")):
        await cli("hub", *command)
    await cli("edge-agent", "status", "--state-dir", str(fleet.agent("dev-0").state_dir))

    # A rollout through every transition that prints --json.
    created = await cli("hub", "rollout", "create", "kws/3", "--target", "group=lab",
                        "--waves", "100%", "--bake", "60s")
    rid = created["rollout"]
    for verb in ("start", "pause", "resume", "abort", "rollback"):
        await cli("hub", "rollout", verb, rid, "--reason", "schema check")
    await cli("hub", "rollout", "list")
    await cli("hub", "rollout", "status", rid, "--devices")

    # Keys and witnesses.
    rotated = await cli("hub", "keys", "rotate", "director")
    shown = await cli("hub", "keys", "show")
    director = next(r for r in shown["roles"] if r["role"] == "director")
    old = next(k for k in director["keyids"] if k != rotated["keyid"])
    await cli("hub", "keys", "revoke", old)
    for n in ("w1", "w2"):
        assert (await asyncio.to_thread(
            CliRunner().invoke, ledger_cli.app,
            ["witness-key", "--out", str(tmp_path / f"{n}.key"), "--name",
             f"witness.example/{n}"])).exit_code == 0
        vkey = (tmp_path / f"{n}.key.vkey").read_text().strip()
        await cli("hub", "witness", "add", f"witness.example/{n}", "--pubkey", vkey)
    await cli("hub", "witness", "list")
    await cli("hub", "witness", "remove", "witness.example/w2")

    # The end of the lifecycle, then the ledger read offline.
    await cli("hub", "model", "deprecate", "kws/1", "--reason", "superseded")
    await cli("hub", "model", "revoke", "kws/3", "--reason", "schema check")
    await cli("hub", "device", "revoke", "dev-0", "--reason", "schema check")
    await cli("hub", "rebuild")
    db = str(fleet.config.database_url())
    await cli("ledger", "show", "--db", db, "--last", "50")
    await cli("ledger", "query", "--db", db, "--kind", "model.approved")
    assert len(await cli("ledger", "tail", "--db", db, "--last", "3")) == 3
    await cli("ledger", "root", "--db", db)
    await cli("ledger", "prove", "--db", db, "--seq", "1")
    # A proof bundle needs a signed checkpoint: the hub signs one within 10 s.
    bundle = tmp_path / "seq1.bundle"
    for _ in range(150):
        made = await asyncio.to_thread(
            CliRunner().invoke, ledger_cli.app,
            ["prove", "--db", db, "--seq", "1", "--out", str(bundle)])
        if made.exit_code == 0:
            break
        await asyncio.sleep(0.1)
    assert bundle.is_file(), made.output
    await cli("ledger", "verify-bundle", str(bundle), "--log-key",
              str(fleet.config.home / "log.vkey"))

    # Contexts live in a file of their own ($FLEET_CONTEXTS).
    os.environ["FLEET_CONTEXTS"] = str(tmp_path / "contexts.toml")
    try:
        result = await asyncio.to_thread(
            CliRunner().invoke, hub_cli.app,
            ["context", "add", "lab", "--from-home", home, "--key",
             str(fleet.config.operator_key_path("admin"))])
        assert result.exit_code == 0, result.output
        await cli("hub", "context", "show", "lab")
        await cli("hub", "context", "list")
    finally:
        del os.environ["FLEET_CONTEXTS"]

    here = _exercised(log, start)
    json_commands = set(COMMANDS.values())
    not_here = json_commands - here
    assert not_here <= set(EXERCISED_ELSEWHERE), (
        "no test runs these with --json, so their schemas are never checked: "
        + ", ".join(sorted(not_here - set(EXERCISED_ELSEWHERE)))
        + "; run them above, or name the test file that does in EXERCISED_ELSEWHERE")


@pytest.mark.timeout(30)
def test_each_schema_exercised_elsewhere_is_run_with_json_there() -> None:
    assert set(EXERCISED_ELSEWHERE) <= set(COMMANDS.values())
    for command, file in EXERCISED_ELSEWHERE.items():
        lines = (REPO_ROOT / file).read_text().splitlines()
        # One call, or a helper and its call: the words and --json within a few lines
        # (a cheap check; the run's summary line says which schemas were exercised).
        windows = ("\n".join(lines[i:i + 12]) for i in range(len(lines)))
        wanted = ['"--json"', *(f'"{word}"' for word in command.split()[1:])]
        assert any(all(w in window for w in wanted) for window in windows), (
            f"{file} does not seem to run `{command} --json`")
