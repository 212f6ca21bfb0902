"""scripts/bench_scale.py at small scale: 200 light simulated devices (testkit.scale_sim)
in 2 processes, a real `hub serve` and nats-server with `hub init`'s accounts, two
rollouts of two waves. Correctness only, never timing: every device applied both
versions in order (its own reports, from the shards), the hub saw every rollout
complete, and `ledger verify --log-key` passes on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.nats, pytest.mark.timeout(90)]


def test_small_scale_run_converges_and_the_ledger_verifies() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--devices", "200",
         "--procs", "2", "--rollouts", "2", "--waves", "50%,100%", "--model-mib", "0.25",
         "--idle-seconds", "0.5", "--settle", "0.2", "--deadline", "60", "--json"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=80, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 200
    assert result["wrong_devices"] == 0, result["wrong_sample"]
    assert result["sim_stats"]["refused"] == 0
    assert [r["version"] for r in result["rollouts"]] == ["1", "2"]
    assert all(len(r["waves_done"]) == 2 for r in result["rollouts"])
    assert result["verify_ok"], result["verify"]
