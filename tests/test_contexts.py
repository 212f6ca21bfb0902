"""`hub context`: an operator works from their own machine with only their own key.

A context is made from a real hub home; then the CLI runs with no --home, no
FLEET_HUB_HOME, from another directory, holding only a copy of the operator's key:
`hub model list`, `hub devices` and `hub deploy` work through the context alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet import REPO_ROOT, Fleet

pytestmark = pytest.mark.timeout(120)


def hub(contexts: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLEET_HUB_HOME", "FLEET_OPERATOR_KEY", "XDG_CONFIG_HOME")}
    env.update(PYTHONPATH=str(REPO_ROOT), FLEET_CONTEXTS=str(contexts), COLUMNS="300")
    return subprocess.run([sys.executable, "-m", "hub.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=60, check=False)


async def test_an_operator_works_through_a_context_with_only_their_key(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    await fleet.release_model(model_files["1"], "kws", "1")
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": "dev-0"})
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    key = laptop / "me.key"
    shutil.copy(fleet.config.operator_key_path("admin"), key)
    contexts = tmp_path / "cfg" / "contexts.toml"
    home = str(fleet.config.home)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return hub(contexts, laptop, *args)

    done = await asyncio.to_thread(run, "context", "add", "lab", "--from-home", home,
                                   "--key", str(key))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(contexts.stat().st_mode) == 0o600
    assert home not in contexts.read_text()  # nothing of the home is kept

    done = await asyncio.to_thread(run, "context", "list", "--json")
    (row,) = json.loads(done.stdout)
    assert (row["name"], row["current"], row["nats"], row["audience"]) == (
        "lab", True, fleet.config.nats_url, fleet.config.origin)

    done = await asyncio.to_thread(run, "model", "list", "--json")
    assert done.returncode == 0, done.stderr
    assert "kws" in done.stdout
    done = await asyncio.to_thread(run, "devices", "--json")
    assert done.returncode == 0 and "dev-0" in done.stdout, done.stderr
    done = await asyncio.to_thread(run, "deploy", "kws/1", "--device", "dev-0")
    assert done.returncode == 0, done.stderr
    assert any(e.kind == "device.assigned" for e in fleet.hub.store.iter_entries())

    # --home still wins over the context (a home whose hub does not exist: exit 2).
    done = await asyncio.to_thread(run, "devices", "--home", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "nowhere" in done.stderr

    # A missing context, or a current one that is gone: one usage line, exit 2.
    done = await asyncio.to_thread(run, "context", "use", "prod")
    assert done.returncode == 2 and done.stderr.startswith("error: no context 'prod'")
    assert len(done.stderr.strip().splitlines()) == 1
    contexts.write_text(contexts.read_text().replace('current = "lab"', 'current = "gone"'))
    done = await asyncio.to_thread(run, "devices")
    assert done.returncode == 2 and "current context 'gone'" in done.stderr
    done = await asyncio.to_thread(run, "context", "use", "lab")
    assert done.returncode == 0
    done = await asyncio.to_thread(run, "context", "remove", "lab")
    assert done.returncode == 0 and json.loads(
        (await asyncio.to_thread(run, "context", "list", "--json")).stdout) == []


def test_a_context_needs_an_audience_and_a_readable_key(tmp_path: Path) -> None:
    contexts = tmp_path / "contexts.toml"
    done = hub(contexts, tmp_path, "context", "add", "x", "--nats", "nats://h:4222",
               "--key", str(tmp_path / "missing.key"), "--audience", "https://h/f")
    assert done.returncode == 2 and "missing.key" in done.stderr
    done = hub(contexts, tmp_path, "context", "add", "x", "--nats", "nats://h:4222",
               "--key", str(tmp_path / "missing.key"))
    assert done.returncode == 2 and "--audience" in done.stderr
    assert not contexts.exists()
