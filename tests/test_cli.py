"""The three console scripts, run as real subprocesses the way people run them.

`hub`, `edge-agent` and `ledger` are run as `python -m <module>` with PYTHONPATH set to
the repository root (so the tests pass from any working directory). Help explains each
command; mistakes end in one `error:` message and a documented exit status (2: usage or
missing home/database, 3: NATS unreachable, 1: the hub refused), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from edge_agent import cli as agent_cli
from edge_agent.trust.root import TrustRoot
from hub import cli as hub_cli
from hub.client import HubClient
from hub.errors import HubError
from ledger import cli as ledger_cli
from ledger.signing import SigningKey
from testkit.nats_server import EmbeddedNats
from testkit.ports import closed_port

REPO_ROOT = Path(__file__).resolve().parent.parent
ROLES = ("root", "release", "director", "log")


def cli_env(columns: str | None = "300") -> dict[str, str]:
    """The environment for a CLI child: this repository importable, no stray hub home.

    A wide COLUMNS keeps rich from wrapping messages mid-word, so the tests read the
    words; `columns=None` leaves the width to the tool, as under cron or CI.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("FLEET_HUB_HOME", None)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = columns
    return env


def run(module: str, *args: str, columns: str | None = "300",
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # Run from outside the repository: nothing may depend on the working directory.
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True,
        env=cli_env(columns), cwd=REPO_ROOT.parent, timeout=timeout, check=False,
    )


def flat(text: str) -> str:
    """Help text without rich's box drawing, on one line with single spaces."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def clear_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The command failed with `code` and an `error:` message naming `words`."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    message = flat(done.stderr)
    assert message.startswith("error:"), done.stderr
    for word in words:
        assert word in message, done.stderr
    return message


# ---------------------------------------------------------------- help

HELP_CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "hub": (("hub.cli",), ("enroll devices", "hub init DIR", "init", "serve", "status",
                           "devices", "deploy", "model", "device", "operator")),
    "hub init": (("hub.cli", "init"), ("Create a hub home", "trust root", "config.toml",
                                       "--force", "--nats", "--database")),
    "hub serve": (("hub.cli", "serve"), ("Run the hub", "SIGTERM", "--home", "--log-level")),
    "hub status": (("hub.cli", "status"), ("ledger head", "--json", "--timeout")),
    "hub model": (("hub.cli", "model"), ("register", "validate", "release", "list")),
    "hub model register": (("hub.cli", "model", "register"), ("tflite", "--name",
                                                              "--version")),
    "hub model list": (("hub.cli", "model", "list"), ("List registered model versions",)),
    "hub device": (("hub.cli", "device"), ("Enroll devices", "enroll")),
    "hub operator": (("hub.cli", "operator"), ("Operators", "add", "revoke")),
    "hub device enroll": (("hub.cli", "device", "enroll"),
                          ("Enroll a device", "trust-root", "letters, digits")),
    "hub devices": (("hub.cli", "devices"), ("The fleet", "last seen", "telemetry",
                                             "FLEET_HUB_HOME")),
    "hub deploy": (("hub.cli", "deploy"), ("signed assignment", "--model", "--version",
                                           "--device", "--all")),
    "edge-agent": (("edge_agent.cli",), ("edge agent", "trust root", "A/B slot", "run",
                                         "status")),
    "edge-agent run": (("edge_agent.cli", "run"), ("SIGTERM", "--device-id", "--trust-root",
                                                   "--state-dir", "--nats")),
    "edge-agent status": (("edge_agent.cli", "status"), ("installed model", "revert",
                                                         "--state-dir", "--json")),
    "ledger": (("ledger.cli",), ("hash-chained", "verify", "show")),
    "ledger verify": (("ledger.cli", "verify"), ("hash chain", "Exit 0", "FAIL at seq",
                                                 "--db", "--json")),
    "ledger show": (("ledger.cli", "show"), ("most recent entries", "--last", "--db")),
}


TOP_LEVEL = ("hub", "edge-agent", "ledger")


@pytest.fixture(scope="module")
def top_level_help() -> dict[str, subprocess.CompletedProcess[str]]:
    """`--help` of the three console scripts, as subprocesses run in parallel."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            name: pool.submit(run, HELP_CASES[name][0][0], "--help") for name in TOP_LEVEL
        }
        return {name: f.result() for name, f in futures.items()}


def assert_explains(command: str, code: int, stdout: str, stderr: str = "") -> None:
    assert code == 0, stderr
    assert "Traceback" not in stderr
    text = flat(stdout)
    assert "Usage:" in text
    for words in HELP_CASES[command][1]:
        assert words in text, f"{words!r} not in the help of {command}:\n{stdout}"


@pytest.mark.parametrize("command", TOP_LEVEL)
def test_console_script_help_exits_0_and_explains_it(
    top_level_help: dict[str, subprocess.CompletedProcess[str]], command: str
) -> None:
    done = top_level_help[command]
    assert_explains(command, done.returncode, done.stdout, done.stderr)


# Subcommand help goes through the very same Typer apps in this process (a start-up per
# command adds up); the three subprocess runs above cover the console-script wiring.
APPS = {"hub": hub_cli.app, "edge-agent": agent_cli.app, "ledger": ledger_cli.app}


@pytest.mark.parametrize("command", [c for c in HELP_CASES if c not in TOP_LEVEL])
def test_subcommand_help_exits_0_and_explains_it(command: str) -> None:
    tool, *words = command.split()
    result = CliRunner().invoke(APPS[tool], [*words, "--help"], prog_name=tool,
                                env={"COLUMNS": "100"})
    assert_explains(command, result.exit_code, result.stdout)
    assert f"Usage: {command}" in flat(result.stdout)


# ---------------------------------------------------------------- how the hub CLI is built


def test_importing_the_hub_cli_loads_no_server_module() -> None:
    """The operator CLI talks to the hub over NATS only: a fresh interpreter that imports
    it has loaded neither SQLAlchemy, SQLModel nor numpy, and no hub module outside the
    client side (`hub serve` and `hub rebuild` import theirs when they run)."""
    client_side = ("hub", "hub.cli", "hub.client", "hub.commands", "hub.commands.envelope",
                   "hub.errors", "hub.home", "hub.home.config", "hub.home.contexts",
                   "hub.home.nats_check",
                   "hub.home.nats_config",
                   "hub.wire")
    probe = ("import json, sys, hub.cli; print(json.dumps(sorted(m for m in sys.modules "
             "if m.partition('.')[0] in ('hub', 'sqlalchemy', 'sqlmodel', 'numpy'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO_ROOT.parent, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert [m for m in loaded if not m.startswith("hub.")] == ["hub"]
    assert [m for m in loaded if m not in client_side and not m.startswith("hub.cli.")] == []


# An agent-only install (`pip install fleetledger`, no `hub` extra) lacks these; a
# meta-path finder that refuses them stands in for that install in a fresh interpreter.
WITHOUT_HUB_EXTRA = """
import sys
class NoHubExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("sqlalchemy", "sqlmodel", "psycopg"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoHubExtra())
sys.argv = ["hub", *sys.argv[1:]]
from hub.cli import main
main()
"""


def test_without_the_hub_extra_help_works_and_serve_names_the_extra(tmp_path: Path) -> None:
    """The operator CLI works on a device install; `hub serve` there says which extra to
    install (exit 2, one line), not a traceback."""
    def hub(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", WITHOUT_HUB_EXTRA, *args],
                              capture_output=True, text=True, env=cli_env(),
                              cwd=tmp_path, timeout=60, check=False)

    helped = hub("--help")
    assert helped.returncode == 0, helped.stderr
    assert "register" in helped.stdout
    served = hub("serve", "--home", str(tmp_path / "home"))
    assert served.returncode == 2, served.stdout + served.stderr
    message = served.stdout + served.stderr
    assert "pip install 'fleetledger[hub]'" in message
    assert "Traceback" not in message


def test_hub_cli_group_modules_import_only_the_common_module() -> None:
    """No import circle: __init__ -> group -> _common; a group imports neither the
    package nor another group."""
    import ast

    cli_dir = REPO_ROOT / "hub" / "cli"
    for path in sorted(cli_dir.glob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
        cli_imports = {m for m in imported if m == "hub.cli" or m.startswith("hub.cli.")}
        allowed = set() if path.name == "_common.py" else {"hub.cli._common"}
        assert cli_imports <= allowed, (path.name, cli_imports)


# ---------------------------------------------------------------- hub init


def test_hub_init_creates_config_trust_root_and_private_keys(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = run("hub.cli", "init", str(home), "--nats", "nats://127.0.0.1:4999")
    assert done.returncode == 0, done.stderr
    assert "next: hub serve --home" in flat(done.stdout)
    config = (home / "config.toml").read_text()
    assert 'nats_url = "nats://127.0.0.1:4999"' in config
    root = TrustRoot.load(home / "trust-root.bin")
    assert set(root.roles) >= set(ROLES)
    for role in ROLES:
        key = home / "keys" / f"{role}.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, role
        assert len(bytes.fromhex(key.read_text().strip())) == 32
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_hub_init_on_an_existing_home_exits_2_and_keeps_the_keys(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run("hub.cli", "init", str(home)).returncode == 0
    keys = {role: (home / "keys" / f"{role}.key").read_bytes() for role in ROLES}
    root = (home / "trust-root.bin").read_bytes()

    done = run("hub.cli", "init", str(home))
    clear_error(done, 2, "already a hub home", "--force")
    assert {role: (home / "keys" / f"{role}.key").read_bytes() for role in ROLES} == keys
    assert (home / "trust-root.bin").read_bytes() == root

    forced = run("hub.cli", "init", str(home), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (home / "keys" / "root.key").read_bytes() != keys["root"]


def test_hub_error_is_one_line_when_stderr_is_a_pipe(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run("hub.cli", "init", str(home)).returncode == 0
    done = run("hub.cli", "init", str(home), columns=None)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# ---------------------------------------------------------------- missing things


def test_hub_devices_with_a_missing_home_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    done = run("hub.cli", "devices", "--home", str(missing))
    clear_error(done, 2, "config.toml not found", "hub init")
    assert not missing.exists()


def test_ledger_verify_with_a_missing_database_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    done = run("ledger.cli", "verify", "--db", str(missing))
    clear_error(done, 2, "no ledger database", "--db")
    assert not missing.exists()


def test_edge_agent_with_a_missing_trust_root_exits_2(tmp_path: Path) -> None:
    done = run("edge_agent.cli", "run", "--device-id", "dev-1", "--state-dir",
               str(tmp_path / "state"), "--trust-root", str(tmp_path / "nope.bin"))
    clear_error(done, 2, "cannot read trust root", "nope.bin")


@pytest.fixture(scope="module")
def devices_without_nats(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """`hub devices` against a port nobody listens on (run once: it takes seconds)."""
    home = tmp_path_factory.mktemp("nonats") / "home"
    with closed_port() as port:  # held: no parallel test's server can take it meanwhile
        url = f"nats://127.0.0.1:{port}"
        assert run("hub.cli", "init", str(home), "--nats", url).returncode == 0
        return url, run("hub.cli", "devices", "--home", str(home))


def test_hub_devices_without_nats_exits_3_naming_the_url(
    devices_without_nats: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    url, done = devices_without_nats
    assert done.returncode == 3, done.stderr
    assert done.stdout == ""
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert f"cannot connect to NATS at {url}" in errors[0]


def test_hub_devices_without_nats_prints_no_traceback(
    devices_without_nats: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    _, done = devices_without_nats
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    assert flat(done.stderr).startswith("error:"), done.stderr


# ---------------------------------------------------------------- against a running hub


async def _hub_answers(url: str, key: SigningKey) -> bool:
    with contextlib.suppress(HubError):
        async with await HubClient.connect(url, key, timeout=2) as client:
            await client.call("status")
            return True
    return False


@pytest.fixture
def served_home(tmp_path: Path, bare_nats_server: EmbeddedNats) -> Iterator[Path]:
    """A hub home with `hub serve` running on it as a child process (NATS without users:
    these tests are about the CLI; tests/test_nats_permissions.py covers auth)."""
    nats_server = bare_nats_server
    home = tmp_path / "home"
    assert run("hub.cli", "init", str(home), "--nats", nats_server.url,
               "--no-auth").returncode == 0
    log = open(tmp_path / "hub.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub.cli", "serve", "--home", str(home)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=cli_env(),
    )
    try:
        admin = SigningKey.load(home / "operators" / "admin.key")
        deadline = time.monotonic() + 30
        while not asyncio.run(_hub_answers(nats_server.url, admin)):
            assert proc.poll() is None, (tmp_path / "hub.log").read_text()
            assert time.monotonic() < deadline, "hub serve did not answer within 30 s"
            time.sleep(0.1)
        yield home
        assert proc.poll() is None, (tmp_path / "hub.log").read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def test_enroll_and_list_devices_through_a_running_hub(served_home: Path) -> None:
    home = str(served_home)
    done = run("hub.cli", "device", "enroll", "dev-1", "--json", "--home", home)
    assert done.returncode == 0, done.stderr
    enrolled = json.loads(done.stdout)
    assert enrolled["device"] == "dev-1"
    (seq,) = enrolled["seq"]  # the bootstrap admin's entry comes first

    # The rest only read (or are refused): run them side by side to save start-up time.
    with ThreadPoolExecutor(max_workers=4) as pool:
        listed = pool.submit(run, "hub.cli", "devices", "--json", "--home", home)
        again = pool.submit(run, "hub.cli", "device", "enroll", "dev-1", "--home", home)
        status = pool.submit(run, "hub.cli", "status", "--json", "--home", home)
        verify = pool.submit(run, "ledger.cli", "verify", "--db", str(served_home / "ledger.db"))

    done = listed.result()
    assert done.returncode == 0, done.stderr
    page = json.loads(done.stdout)
    assert page["device_count"] == 1 and page["next_offset"] is None
    assert [(r["device"], r["state"], r["enrolled_seq"]) for r in page["devices"]] == [
        ("dev-1", "enrolled", seq)
    ]
    clear_error(again.result(), 1, "dev-1 is already enrolled")
    assert status.result().returncode == 0, status.result().stderr
    assert json.loads(status.result().stdout)["entries"] == seq + 1
    assert verify.result().returncode == 0, verify.result().stderr
    assert verify.result().stdout.startswith(f"OK: {seq + 1} entries")


def test_deploy_needs_devices_or_all_before_calling_the_hub(tmp_path: Path) -> None:
    # No hub home exists: the usage error must come first, without contacting anything.
    done = run("hub.cli", "deploy", "--model", "kws", "--version", "1",
               "--home", str(tmp_path / "none"))
    clear_error(done, 2, "--device", "--all")


# ---------------------------------------------------------------- conventions (issue 15)


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group under a click command, with its path of names."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


CLICK = {tool: typer.main.get_command(app) for tool, app in APPS.items()}
EVERY_COMMAND = [(tool, path) for tool in ("hub", "ledger", "edge-agent")
                 for path, _ in _commands(CLICK[tool])]


def test_the_walk_finds_every_command() -> None:
    paths = {" ".join((tool, *path)) for tool, path in EVERY_COMMAND}
    assert {"hub", "hub deploy", "hub model approve", "hub rollout rollback", "hub keys revoke",
            "hub witness add", "hub device tag", "ledger", "ledger verify-bundle",
            "ledger tail"} <= paths
    assert len(paths) > 50


@pytest.mark.parametrize(("tool", "path"), EVERY_COMMAND,
                         ids=[" ".join((t, *p)) for t, p in EVERY_COMMAND])
def test_every_command_has_examples_and_short_help(tool: str, path: tuple[str, ...]) -> None:
    runner = CliRunner()
    long = runner.invoke(APPS[tool], [*path, "--help"], prog_name=tool, env={"COLUMNS": "100"})
    short = runner.invoke(APPS[tool], [*path, "-h"], prog_name=tool, env={"COLUMNS": "100"})
    assert long.exit_code == 0, long.output
    assert short.exit_code == 0 and short.stdout == long.stdout
    assert "Examples:" in long.stdout
    assert f"{tool} {' '.join(path)}".strip() in long.stdout.split("Examples:")[1]


def _example_lines(epilog: str) -> list[str]:
    lines = epilog.split("Examples:", 1)[1].splitlines()
    return [line.strip().split("    (")[0] for line in lines if line.strip()]


def _resolve(argv: list[str]) -> tuple[Any, list[str], list[str]]:
    tool, *args = argv
    command, path = CLICK[tool], [tool]
    while args and args[0] in getattr(command, "commands", {}):
        command = command.commands[args[0]]
        path.append(args.pop(0))
    return command, path, args


@pytest.mark.parametrize(("tool", "path"), EVERY_COMMAND,
                         ids=[" ".join((t, *p)) for t, p in EVERY_COMMAND])
def test_every_example_names_real_commands_and_options(tool: str, path: tuple[str, ...]) -> None:
    """Each example line parses: its command exists and takes every option it passes."""
    import shlex

    command = dict(_commands(CLICK[tool]))[path]
    for line in _example_lines(command.epilog or ""):
        argv = shlex.split(line)
        while argv and "=" in argv[0]:  # LEDGER_DB=... ledger verify
            argv.pop(0)
        if not argv or argv[0] not in CLICK:
            continue  # e.g. .venv/bin/python scripts/make_validation_data.py
        target, names, args = _resolve(argv)
        assert names == argv[: len(names)], line
        ctx = target.make_context(names[-1], [], resilient_parsing=True)
        known = {opt for param in target.get_params(ctx)
                 for opt in (*param.opts, *param.secondary_opts)}
        unknown = [a.split("=")[0] for a in args
                   if a.startswith("-") and a.split("=")[0] not in known]
        assert not unknown, f"{line}: {' '.join(names)} takes no {unknown}"


@pytest.mark.parametrize(("tool", "module"), [("hub", "hub.cli"),
                                              ("edge-agent", "edge_agent.cli")])
def test_version_and_completion(tool: str, module: str) -> None:
    from importlib.metadata import version

    done = run(module, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{tool} (fleetledger) {version('fleetledger')}"
    helped = CliRunner().invoke(APPS[tool], ["--help"], prog_name=tool)
    assert "--install-completion" in helped.stdout and "--show-completion" in helped.stdout


@pytest.mark.parametrize(("ref", "model", "version", "expected"), [
    ("kws/1", None, None, ("kws", "1")),
    (None, "kws", "1", ("kws", "1")),
    (None, "kws/2", None, ("kws", "2")),
    ("kws/1", "kws", None, "not both"),
    (None, "kws/1", "2", "drop --version"),
    (None, "kws", None, "NAME/VERSION"),
    (None, None, None, "NAME/VERSION"),
    ("kws", None, None, "expected NAME/VERSION"),
])
def test_name_slash_version_or_the_old_flags(ref: str | None, model: str | None,
                                             version: str | None,
                                             expected: tuple[str, str] | str) -> None:
    from hub.cli._common import resolve_ref
    from hub.errors import UsageError

    if isinstance(expected, tuple):
        assert resolve_ref(ref, model, version) == expected
    else:
        with pytest.raises(UsageError, match=expected):
            resolve_ref(ref, model, version)


def test_deploy_and_rollout_refuse_two_model_spellings_before_calling_the_hub(
        tmp_path: Path) -> None:
    home = str(tmp_path / "none")
    with ThreadPoolExecutor(max_workers=3) as pool:
        both = pool.submit(run, "hub.cli", "deploy", "kws/1", "--model", "kws", "--all",
                           "--home", home)
        neither = pool.submit(run, "hub.cli", "rollout", "create", "--home", home)
        register = pool.submit(run, "hub.cli", "model", "register", __file__, "--name", "kws",
                               "--home", home)
    clear_error(both.result(), 2, "not both")
    clear_error(neither.result(), 2, "NAME/VERSION")
    clear_error(register.result(), 2, "NAME/VERSION")


def test_hub_status_wait_gives_up_with_exit_3(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with closed_port() as port:  # held: no parallel test's server can take it meanwhile
        url = f"nats://127.0.0.1:{port}"
        assert run("hub.cli", "init", str(home), "--nats", url).returncode == 0
        started = time.monotonic()
        done = run("hub.cli", "status", "--wait", "1", "--home", str(home))
    clear_error(done, 3, url)
    assert time.monotonic() - started >= 1


def test_name_slash_version_and_80_column_key_ids_against_a_running_hub(
        served_home: Path) -> None:
    home = str(served_home)
    with ThreadPoolExecutor(max_workers=4) as pool:
        deploy = pool.submit(run, "hub.cli", "deploy", "kws/1", "--all", "--home", home)
        old = pool.submit(run, "hub.cli", "deploy", "--model", "kws", "--version", "1",
                          "--all", "--home", home)
        keys = pool.submit(run, "hub.cli", "keys", "show", "--json", "--home", home)
        narrow = pool.submit(run, "hub.cli", "keys", "show", "--home", home, columns="80")
        operators = pool.submit(run, "hub.cli", "operator", "list", "--home", home,
                                columns="80")
        status = pool.submit(run, "hub.cli", "status", "--wait", "10", "--home", home)
    # Both spellings reach the hub with the same model version (and are refused alike).
    refused = clear_error(deploy.result(), 1, "kws")
    assert clear_error(old.result(), 1, "kws") == refused
    assert status.result().returncode == 0, status.result().stderr
    table = narrow.result()
    assert table.returncode == 0, table.stderr
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    for role in json.loads(keys.result().stdout)["roles"]:
        for keyid in role["keyids"]:
            assert keyid in table.stdout, (keyid, table.stdout)
    admin = SigningKey.load(served_home / "operators" / "admin.key")
    assert admin.public.keyid in operators.result().stdout, operators.result().stdout


def test_demo_refuses_a_non_empty_data_directory_it_did_not_make(tmp_path: Path) -> None:
    data = tmp_path / "mine"
    data.mkdir()
    (data / "thesis.tex").write_text("years of work")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--data",
                           str(data)], capture_output=True, text=True, env=cli_env(),
                          cwd=tmp_path, timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not deleting it" in flat(done.stdout)
    assert (data / "thesis.tex").read_text() == "years of work"


def test_error_lines_print_hostile_names_as_themselves(capsys: pytest.CaptureFixture[str]) -> None:
    """A refusal can quote names a device or an operator chose; rich markup in them is
    printed as text, and an unbalanced closing tag does not crash the CLI."""
    from hub.cli._common import fail

    exit_ = fail("no device named '[bold]x[/nope]' is enrolled", 1)
    assert exit_.exit_code == 1
    assert "no device named '[bold]x[/nope]' is enrolled" in capsys.readouterr().err
