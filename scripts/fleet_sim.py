#!/usr/bin/env python3
"""Run N simulated devices (real EdgeAgents, one asyncio loop) against a running hub.

    .venv/bin/python scripts/fleet_sim.py --home HUB_HOME --devices 50 --group lab \
        [--rate 2] [--fail-install 0.2 --fail-version 2] [--error-rate 0.3 --error-version 2]
        [--drift 5.0 --drift-version 2]

Enrolls the devices (each with its own key) and tags them, then runs until Ctrl-C.
Faults go to a deterministic share of the devices (testkit.fleet_sim.SimFleet.pick).
Watch them with `hub rollout status ID --watch` and `hub telemetry`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.client import HubClient
from hub.home.config import load_config
from ledger.signing import SigningKey
from testkit.fleet_sim import SimFleet


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path, required=True, help="hub home (for URL, keys, root)")
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--prefix", default="sim")
    p.add_argument("--state", type=Path, default=Path("sim-fleet"), help="state directory")
    p.add_argument("--group", default="sim")
    p.add_argument("--rate", type=float, default=2.0, help="inferences/s per device")
    p.add_argument("--window", type=float, default=1.0, help="telemetry window (s)")
    p.add_argument("--fail-install", type=float, default=0.0, help="share failing install")
    p.add_argument("--fail-version", default=None)
    p.add_argument("--error-rate", type=float, default=0.0, help="inference error rate")
    p.add_argument("--error-share", type=float, default=1.0, help="share with that rate")
    p.add_argument("--error-version", default=None)
    p.add_argument("--drift", type=float, default=0.0, help="output shift (drift)")
    p.add_argument("--drift-version", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    config = load_config(args.home)
    key = SigningKey.load(config.operator_key_path("admin"))

    async def run() -> None:
        sim = SimFleet(config.nats_url, args.state, config.trust_root_path, args.devices,
                       prefix=args.prefix, rate=args.rate, window=args.window)
        async with await HubClient.connect(config.nats_url, key,
                                           auth=config.operator_auth(key)) as admin:
            await sim.enroll(admin, group=args.group)
        await sim.start()
        faults: dict[str, dict[str, object]] = {d: {} for d in sim.ids}
        for d in sim.pick(args.fail_install, "install"):
            faults[d].update(install_error=True, version=args.fail_version)
        for d in sim.pick(args.error_share, "errors") if args.error_rate else []:
            faults[d].update(error_rate=args.error_rate, version=args.error_version)
        for d in sim.ids if args.drift else []:
            faults[d].update(output_shift=args.drift, version=args.drift_version)
        for d, f in faults.items():
            if f:
                sim.inject([d], **f)
        print(f"{args.devices} devices running (group {args.group}); Ctrl-C to stop")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(asyncio.CancelledError):
            await stop.wait()
        await sim.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
