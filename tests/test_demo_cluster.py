"""`scripts/demo --cluster` tells its story to the end: three NATS nodes, PostgreSQL,
two hubs, the leader SIGKILLed after the first wave, the standby takes the lease and
completes the rollout, every device runs the new model and the ledger verifies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet import REPO_ROOT
from tests.pg import PgUnavailable, find_pg_bin

pytestmark = [pytest.mark.nats, pytest.mark.postgres, pytest.mark.tflite,
              pytest.mark.timeout(400)]


def test_the_cluster_demo_survives_its_leader(tmp_path: Path) -> None:
    try:
        find_pg_bin()
    except PgUnavailable as exc:
        if os.environ.get("FLEET_ALLOW_NO_PG") == "1":
            pytest.skip(f"FLEET_ALLOW_NO_PG=1: {exc}")
        raise
    data = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--cluster", "--data",
         str(data), "--devices", "3"],
        capture_output=True, text=True, timeout=360, check=False, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="200"))
    story = done.stdout
    assert done.returncode == 0, story[-4000:] + done.stderr[-2000:]
    assert "NATS cluster of 3" in story and "streams at 3 replicas" in story
    killed = re.search(r"SIGKILL (hub-[ab]) \(pid \d+, the leader, epoch (\d+)\)", story)
    assert killed, story
    took = re.search(r"(hub-[ab]) took the lease ([\d.]+) s later .*epoch (\d+)", story)
    assert took, story
    assert took.group(1) != killed.group(1)
    assert int(took.group(3)) > int(killed.group(2))  # a new epoch: the old one is fenced
    assert f"completed under {took.group(1)}: 3 of 3 devices run kws/2" in story
    assert "ledger verify: passed" in story
    # Nothing left running from the demo: every process it started was ours to stop.
    leftover = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True,
                              check=False)
    assert leftover.stdout.strip() == "", leftover.stdout
