#!/usr/bin/env python3
"""`hub deploy --all` to N enrolled devices, next to raw KV puts of the same assignments
measured in the same run. Prints a table; results go into docs/BENCHMARKS.md by hand.

    .venv/bin/python scripts/bench_deploy.py [--devices 1000] [--repeat 3]

The deploy is the whole command as an operator sends it to a running hub (in this
process, on a nats-server with the hub's users and permissions): signed command,
checks, one signed assignment and one ledger entry per device, one commit, then the KV
writes. The baselines put the same signed assignments into a KV bucket of their own
with nats-py: one after another (what the hub did before), and 64 in flight (what it
does now).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nats.js.api import KeyValueConfig  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edge_agent.transport.connect import connect as nats_connect  # noqa: E402
from hub import events as ev  # noqa: E402
from hub.client import HubClient  # noqa: E402
from hub.home.config import init_home, load_config, set_nats_url  # noqa: E402
from hub.home.nats_config import server_conf_path  # noqa: E402
from hub.service.app import HubService  # noqa: E402
from ledger.signing import SigningKey  # noqa: E402
from testkit.modelgen import model_for_version, write_validation_set  # noqa: E402
from testkit.nats_server import EmbeddedNats  # noqa: E402


async def run(args: argparse.Namespace) -> None:
    console = Console()
    root = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    config = init_home(root / "hub", "nats://127.0.0.1:4222")
    with EmbeddedNats(store_dir=root / "nats",
                      config_file=server_conf_path(config.home)) as server:
        set_nats_url(config.home, server.url)
        config = load_config(config.home)
        hub = HubService(config)
        await hub.start()
        try:
            admin_key = SigningKey.load(config.operator_key_path("admin"))
            approver = SigningKey.generate()
            async with await HubClient.connect(server.url, admin_key, 120,
                                               config.operator_auth(admin_key)) as admin:
                await admin.call("operator.add", {"name": "approver", "roles": ["approver"],
                                                  "public": approver.public.raw})
                model = root / "model.tflite"
                model.write_bytes(model_for_version(1))
                await admin.register_model(model, "kws", "1")
                data = write_validation_set(model, root / "validation.npz")
                await admin.validate_model("kws", "1", data)
                async with await HubClient.connect(
                        server.url, approver, 60, config.operator_auth(approver)) as appr:
                    await appr.call("model.approve", {"name": "kws", "version": "1"})
                await admin.call("model.release", {"name": "kws", "version": "1"})
                began = time.perf_counter()
                ids = [f"dev-{i:04d}" for i in range(args.devices)]
                slots = asyncio.Semaphore(16)

                async def enroll(device: str) -> None:
                    async with slots:
                        await admin.call("device.enroll", {"device": device})

                await asyncio.gather(*(enroll(d) for d in ids))
                console.print(f"{args.devices} devices enrolled in "
                              f"{time.perf_counter() - began:.1f} s")
                deploys = []
                for _ in range(args.repeat):
                    began = time.perf_counter()
                    await admin.call("deploy", {"model": "kws", "version": "1", "all": True})
                    deploys.append(time.perf_counter() - began)
            envelopes = [e.payload["assignment"] for e in hub.store.iter_entries()
                         if e.kind == ev.DEVICE_ASSIGNED][-args.devices:]
            nc = await nats_connect(server.url, config.nats_auth("hub"), name="bench")
            try:
                kv = await nc.jetstream().create_key_value(
                    KeyValueConfig(bucket="bench_assignments", history=1))
                one_by_one, in_flight = [], []
                put_slots = asyncio.Semaphore(64)

                async def put(device: str, value: bytes) -> None:
                    async with put_slots:
                        await kv.put(device, value)

                for _ in range(args.repeat):
                    began = time.perf_counter()
                    for device, value in zip(ids, envelopes, strict=True):
                        await kv.put(device, value)
                    one_by_one.append(time.perf_counter() - began)
                    began = time.perf_counter()
                    await asyncio.gather(*(put(d, v) for d, v in zip(ids, envelopes,
                                                                     strict=True)))
                    in_flight.append(time.perf_counter() - began)
            finally:
                await nc.close()
        finally:
            await hub.stop()
    deploy, seq, par = (statistics.median(x) for x in (deploys, one_by_one, in_flight))
    table = Table("measure", "median s", "runs", "vs raw, 64 in flight",
                  title=f"deploy --all to {args.devices} devices")
    table.add_row("hub deploy (command, checks, signing, ledger, KV writes)", f"{deploy:.2f}",
                  " / ".join(f"{x:.2f}" for x in deploys), f"{deploy / par:.1f}x")
    table.add_row("raw KV puts of the same assignments, one after another", f"{seq:.2f}",
                  " / ".join(f"{x:.2f}" for x in one_by_one), f"{seq / par:.1f}x")
    table.add_row("raw KV puts, 64 in flight (baseline)", f"{par:.2f}",
                  " / ".join(f"{x:.2f}" for x in in_flight), "1.0x")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
