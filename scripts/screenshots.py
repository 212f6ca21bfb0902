#!/usr/bin/env python3
"""Screenshots of the fleet dashboard and the HTML audit report for the README.

    .venv/bin/python scripts/screenshots.py [--out docs/img]

Runs `scripts/demo --keep` (a real nats-server, hub and five agents; v1 then v2 to every
device), waits until it says it is still serving, takes PNGs of dashboard pages with
Debian's headless Chromium, writes `ledger report` for one device of the demo's ledger
and takes a PNG of it from file://, then stops the demo (SIGTERM: it cleans up every
process it started). Exit 1 with the reason when Chromium or the demo is not there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PAGES = {  # file name -> dashboard path
    "dashboard-overview.png": "/",
    "dashboard-devices.png": "/devices",
    "dashboard-model.png": "/model?name=kws&version=2",
    "dashboard-ledger.png": "/ledger",
}


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def shoot(browser: str, url: str, out: Path, height: int = 1000) -> None:
    profile = tempfile.mkdtemp(prefix="shot-profile-")
    try:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={profile}",
                        f"--window-size=1280,{height}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = p.parse_args()
    browser = chromium()
    if browser is None:
        print("no chromium here (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="shots-demo-")) / "demo"
    log = data.parent / "demo.log"
    env = dict(os.environ, COLUMNS="110")
    with log.open("w") as out:
        demo = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), "--keep",
                                 "--data", str(data)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        url = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            found = re.search(r"still serving: dashboard (http://\S+/)", text)
            if found:
                url = found.group(1).rstrip("/")
                break
            if demo.poll() is not None:
                print(f"the demo ended early (exit {demo.returncode}):\n{text[-2000:]}",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
        if url is None:
            print("the demo did not finish within 5 minutes", file=sys.stderr)
            return 1
        for name, path in PAGES.items():
            shoot(browser, url + path, args.out / name)
            print(f"wrote {args.out / name}")
        report = data.parent / "report.html"
        subprocess.run([str(BIN / "ledger"), "report", "--db", str(data / "hub" / "ledger.db"),
                        "--log-key", str(data / "hub" / "log.vkey"), "--device", "dev-01",
                        "--out", str(report)], check=True, env=env)
        shoot(browser, report.as_uri(), args.out / "audit-report.png", height=1400)
        print(f"wrote {args.out / 'audit-report.png'}")
        return 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            demo.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            demo.wait(60)
        shutil.rmtree(data.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
