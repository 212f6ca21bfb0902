"""Long-running commands while NATS is down or refuses them (issue 13, "Quiet, useful
logs"): real `edge-agent run`, `hub serve` and `ledger witness` processes pointed at a
closed port, or at a real nats-server that does not know the device. Each logs one line
per failed attempt (exponential backoff, the reason named, no traceback), writes plain
lines when stderr is not a terminal or JSON objects with `--log-format json`, and
honours SIGTERM while still connecting: exit 0 within 2 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.home.config import HubConfig
from ledger.retry import backoff_delay, failure_reason
from ledger.signing import SigningKey
from testkit.nats_server import EmbeddedNats
from testkit.ports import closed_port
from tests.fleet import REPO_ROOT

WINDOW_S = 3.0  # the window the log rate is measured over
# Attempts in WINDOW_S with backoff 0.25 s doubling (+-20 %): 0.2+0.4+0.8+1.6 < 3.0 < 6.2,
# so at most 5 lines, plus the start-up lines of each command.
MAX_LINES = 10
STOP_WITHIN_S = 2.0


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


class Running:
    """A CLI as a child process, its stderr in a file (not a terminal)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log_path = log
        with open(log, "wb") as f:
            self.process = subprocess.Popen([sys.executable, "-m", *args],
                                            stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                            env=env(), cwd=log.parent)

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def wait_for_line(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines()):
            assert self.process.poll() is None, "\n".join(self.lines())
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "\n".join(self.lines())
            time.sleep(0.05)

    def lines_over_window(self, first_line: str) -> list[str]:
        """The log after WINDOW_S seconds from the first retry line (the event)."""
        self.wait_for_line(first_line)
        time.sleep(WINDOW_S)  # the measurement window itself
        return self.lines()

    def stop(self) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError("ignored SIGTERM for 10 s:\n"
                                 + "\n".join(self.lines())) from None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def closed_url() -> Iterator[str]:
    """A NATS URL whose port refuses connections for the whole test (held, so that no
    server of a parallel test can take it)."""
    with closed_port() as port:
        yield f"nats://127.0.0.1:{port}"


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:  # whatever the test did: nothing is left behind
        r.kill()


def check_quiet(lines: list[str], reason: str) -> list[str]:
    text = "\n".join(lines)
    assert "Traceback" not in text and "╭" not in text and "│" not in text, text
    retries = [line for line in lines if "failed (" in line]
    assert retries and all(f"({reason}:" in line for line in retries), text
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines in {WINDOW_S} s:\n{text}"
    return retries


def agent_args(hub_home: HubConfig, tmp_path: Path, url: str, *extra: str) -> list[str]:
    return ["edge_agent.cli", "run", "--device-id", "ghost-1", "--nats", url,
            "--state-dir", str(tmp_path / "state"), "--trust-root",
            str(hub_home.trust_root_path), "--no-api", *extra]


def test_edge_agent_with_nats_down_logs_a_line_per_retry_and_stops_on_sigterm(
    tmp_path: Path, hub_home: HubConfig, running: list[Running], closed_url: str,
) -> None:
    url = closed_url
    agent = Running(agent_args(hub_home, tmp_path, url), tmp_path / "agent.log")
    running.append(agent)
    lines = agent.lines_over_window("connecting to NATS")
    retries = check_quiet(lines, "unreachable")
    assert len(retries) >= 3  # it keeps trying
    assert all(line.split(" ", 3)[2] in ("INFO", "WARNING") for line in lines), lines
    code, took = agent.stop()
    assert code == 0 and took < STOP_WITHIN_S, (code, took, agent.lines())
    assert "stopped before NATS was reached" in agent.lines()[-1]


def test_hub_serve_with_nats_down_logs_json_and_stops_on_sigterm(
    tmp_path: Path, hub_home: HubConfig, running: list[Running], closed_url: str,
) -> None:
    url = closed_url
    hub = Running(["hub.cli", "serve", "--home", str(hub_home.home), "--nats", url,
                   "--wait-nats", "60", "--log-format", "json"], tmp_path / "hub.log")
    running.append(hub)
    lines = hub.lines_over_window("connecting to NATS")
    check_quiet(lines, "unreachable")
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    retries = [r for r in records if r.get("reason")]
    assert retries and all(r["reason"] == "unreachable" and r["level"] == "WARNING"
                           and {"ts", "logger", "message", "attempt", "retry_in_s"} <= set(r)
                           for r in retries), records
    assert [r["attempt"] for r in retries] == list(range(1, len(retries) + 1))
    code, took = hub.stop()
    assert code == 0 and took < STOP_WITHIN_S, (code, took, hub.lines())


def test_hub_serve_gives_up_after_wait_nats_with_exit_3(
    tmp_path: Path, hub_home: HubConfig, running: list[Running], closed_url: str,
) -> None:
    url = closed_url
    hub = Running(["hub.cli", "serve", "--home", str(hub_home.home), "--nats", url,
                   "--wait-nats", "1"], tmp_path / "hub.log")
    running.append(hub)
    assert hub.process.wait(timeout=30) == 3
    lines = hub.lines()
    assert "Traceback" not in "\n".join(lines)
    assert "error: cannot reach NATS" in lines[-1] and "unreachable" in lines[-1], lines


def test_ledger_witness_with_nats_down_logs_json_and_stops_on_sigterm(
    tmp_path: Path, hub_home: HubConfig, running: list[Running], closed_url: str,
) -> None:
    key = tmp_path / "w1.key"
    subprocess.run([sys.executable, "-m", "ledger.cli", "witness-key", "--out", str(key),
                    "--name", "witness.example/w1"], env=env(), check=True,
                   capture_output=True, timeout=60)
    url = closed_url
    witness = Running(["ledger.cli", "witness", "--nats", url, "--log-key",
                       str(hub_home.home / "log.vkey"), "--key", str(key), "--name",
                       "witness.example/w1", "--state", str(tmp_path / "w1.json"),
                       "--log-format", "json"], tmp_path / "witness.log")
    running.append(witness)
    lines = witness.lines_over_window("connecting to NATS")
    check_quiet(lines, "unreachable")
    assert all(json.loads(line)["reason"] == "unreachable" for line in lines)
    code, took = witness.stop()
    assert code == 0 and took < STOP_WITHIN_S, (code, took, witness.lines())


def test_an_unknown_device_is_told_unauthorised_once_per_retry(
    tmp_path: Path, hub_home: HubConfig, nats_server: EmbeddedNats, running: list[Running],
) -> None:
    """A device the hub's users file does not list (never enrolled, or revoked): the
    real nats-server with the hub's configuration refuses it."""
    key = tmp_path / "ghost.key"
    SigningKey.generate().save(key)
    agent = Running(agent_args(hub_home, tmp_path, nats_server.url, "--device-key", str(key)),
                    tmp_path / "agent.log")
    running.append(agent)
    lines = agent.lines_over_window("connecting to NATS")
    retries = check_quiet(lines, "unauthorised")
    assert len(retries) >= 2
    code, took = agent.stop()
    assert code == 0 and took < STOP_WITHIN_S, (code, took, agent.lines())


@pytest.mark.parametrize(("error", "reason"), [
    (ConnectionRefusedError(111, "Connect call failed"), "unreachable"),
    (TimeoutError(), "unreachable"),
    (Exception("nats: 'Authorization Violation'"), "unauthorised"),
    (Exception("nats: 'User Authentication Revoked'"), "revoked"),
])
def test_failure_reasons(error: Exception, reason: str) -> None:
    assert failure_reason(error) == reason


def test_backoff_doubles_up_to_its_cap() -> None:
    plain = [backoff_delay(n, first=0.25, cap=5.0, jitter=0.0) for n in range(1, 9)]
    assert plain == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert all(0.8 * 5.0 <= backoff_delay(50) <= 1.2 * 5.0 for _ in range(100))
