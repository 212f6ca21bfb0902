"""The agent's long-running tasks run under the supervisor (issue 13, item 1): a task
that raises is logged once and restarted, the agent keeps installing and reporting, and
`edge-agent status` shows every task's state and last error. A real nats-server and hub;
the agent in process so the test can make one of its loops fail once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.agent import TASKS_NAME, AgentConfig, EdgeAgent
from edge_agent.cli import TASKS_NAME as CLI_TASKS_NAME
from tests.device_kit import applied, deploy_and_wait
from tests.fleet import Fleet

DEVICE = "dev-0"


def test_the_cli_reads_the_file_the_agent_writes() -> None:
    assert CLI_TASKS_NAME == TASKS_NAME


@pytest.mark.timeout(120)
async def test_a_failing_agent_task_restarts_and_status_shows_it(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await fleet.release_model(model_files["1"], "kws", "1")
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
    state = tmp_path / "agent-state"
    agent = EdgeAgent(AgentConfig(
        device_id=DEVICE, nats_url=fleet.url_as(), state_dir=state,
        trust_root=fleet.config.trust_root_path,
        device_key=fleet.bundle(DEVICE) / "device.key",
        window_seconds=0.5, serve_api=False, isolate_preflight=False,
    ))
    original = agent._watch_roots
    calls = 0

    async def watch_roots_failing_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected: the roots watch broke")
        await original()

    agent._watch_roots = watch_roots_failing_once  # type: ignore[method-assign]
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="edge_agent"):
        running = asyncio.create_task(agent.run(stop))
        try:
            async with await fleet.client() as client:
                # The agent still does its work: installs and reports.
                await deploy_and_wait(fleet, client, "1", [DEVICE])
            assert applied(fleet, DEVICE, "1")
            for _ in range(100):  # restarted after the supervisor's backoff (0.5 s)
                if calls >= 2:
                    break
                await asyncio.sleep(0.1)
            roots = agent.supervisor.state("roots")
            assert calls >= 2 and roots.restarts == 1 and roots.state == "running"

            def saved() -> dict[str, dict[str, object]]:
                doc = json.loads((state / TASKS_NAME).read_text())
                return {t["name"]: t for t in doc["tasks"]}

            for _ in range(100):  # written on change, every 2 s at most
                with contextlib.suppress(OSError, ValueError, KeyError):
                    if saved()["roots"]["restarts"] == 1:
                        break
                await asyncio.sleep(0.1)
            shown = subprocess.run(
                [sys.executable, "-m", "edge_agent.cli", "status", "--state-dir", str(state),
                 "--json"], capture_output=True, text=True, timeout=60)
            assert shown.returncode == 0, shown.stderr
            info = json.loads(shown.stdout)["agent"]
            assert info["running"] is True
            tasks = {t["name"]: t for t in info["tasks"]}
            assert set(tasks) >= {"outbox", "watch", "roots", "inference"}
            assert tasks["roots"]["restarts"] == 1
            assert "injected: the roots watch broke" in tasks["roots"]["last_error"]
            assert all(t["state"] == "running" for t in tasks.values())
        finally:
            stop.set()
            await asyncio.wait_for(running, 15)
    failures = [r.getMessage() for r in caplog.records if "roots failed" in r.getMessage()]
    assert failures == ["roots failed: RuntimeError: injected: the roots watch broke; "
                        "restarting (failure 1 in a row)"]
    assert agent.fatal_reason == ""
    # After a clean stop the file says stopped, and status says the process is gone.
    tasks = {t["name"]: t for t in json.loads((state / TASKS_NAME).read_text())["tasks"]}
    assert all(t["state"] == "stopped" for t in tasks.values())
