"""`--watch` on the hub's lists (issue 15): one connection, the answer drawn again every
N seconds until Ctrl-C or SIGTERM (exit 0); with --json one document per line, each
checked against the command's schema (FLEET_CHECK_JSON_SCHEMAS, tests/conftest.py). A
real hub; the CLI in a child process as a person runs it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(120)
REPO_ROOT = Path(__file__).resolve().parent.parent


async def next_line(proc: asyncio.subprocess.Process, timeout: float = 30.0) -> bytes:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert line, "the watch ended early"
    return line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_devices_watch_redraws_until_stopped(fleet: Fleet, sig: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", "devices", "--watch", "0.5", "--json",
        "--home", str(fleet.config.home), "--key",
        str(fleet.config.operator_key_path("admin")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        first = json.loads(await next_line(proc))
        async with await fleet.client() as admin:
            await admin.call("device.enroll", {"device": "dev-watched"})
        # Later documents see the new device, without a new command.
        for _ in range(20):
            doc = json.loads(await next_line(proc))
            if doc["device_count"] == first["device_count"] + 1:
                break
        else:
            raise AssertionError("the watch never showed the enrolled device")
        assert "dev-watched" in {d["device"] for d in doc["devices"]}
        proc.send_signal(sig)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_rollout_list_and_status_watch_as_tables(fleet: Fleet) -> None:
    for argv, expected in ((["rollout", "list"], "rollout(s)"), (["status"], "ledger:")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hub.cli", *argv, "--watch", "0.5", "--home",
            str(fleet.config.home), "--key", str(fleet.config.operator_key_path("admin")),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="120"))
        try:
            seen = ""
            while seen.count(expected) < 2 or seen.count("every 0.5 s, Ctrl-C stops") < 2:
                seen += (await next_line(proc)).decode()
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
