"""The walking skeleton, end to end: hub -> NATS -> agents -> TFLite -> reports -> ledger.

Real nats-server, real SQLite ledger, real agent processes running the real TFLite
runtime. Every wait is on an event with a timeout.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest

from edge_agent import protocol as proto
from edge_agent.protocol.names import ASSIGNMENTS_BUCKET, MANIFESTS_BUCKET, RELEASES_BUCKET
from edge_agent.runtime import LoadedModel
from edge_agent.slots import SlotStore
from hub import events as ev
from hub.client import HubClient, file_digest
from ledger.signing import SigningKey
from ledger.storage.store import LedgerStore
from tests.fleet import REPO_ROOT, Fleet

pytestmark = pytest.mark.timeout(180)


def probe_of(path: Path) -> np.ndarray:
    return LoadedModel.load(path).smoke_test().ravel()


def applied(fleet: Fleet, device: str, version: str) -> bool:
    return any(e.payload["version"] == version
               for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, device))


async def setup_devices(fleet: Fleet, client: HubClient, devices: list[str]) -> None:
    for device in devices:
        await client.call("device.enroll", {"device": device})
        fleet.agent(device).start()


async def deploy_and_wait(fleet: Fleet, client: HubClient, version: str,
                          devices: list[str]) -> None:
    await client.call("deploy", {"model": "kws", "version": version, "devices": devices})
    await fleet.feed.wait_for(
        lambda _: all(applied(fleet, d, version) for d in devices), timeout=60,
        what=f"{devices} to apply kws/{version}",
    )


def run_ledger_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "ledger.cli", *args],
                          capture_output=True, text=True, env=env, timeout=60)


async def test_three_agents_take_v1_then_v2_and_the_ledger_proves_it(
    fleet: Fleet, model_files: dict[str, Path]
) -> None:
    devices = ["dev-0", "dev-1", "dev-2"]
    async with await fleet.client() as client:
        await fleet.release_model(model_files["1"], "kws", "1")
        await setup_devices(fleet, client, devices)
        await deploy_and_wait(fleet, client, "1", devices)
        await fleet.release_model(model_files["2"], "kws", "2")
        await deploy_and_wait(fleet, client, "2", devices)

        # Each device's reported output for the probe input is the output of the
        # model it says it runs, computed here by the same runtime.
        want = {v: probe_of(model_files[v]) for v in ("1", "2")}
        assert not np.allclose(want["1"], want["2"])
        for entry in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED):
            got = np.asarray(entry.payload["probe_output"], dtype=np.float32)
            np.testing.assert_allclose(got, want[entry.payload["version"]], rtol=1e-5)
            assert entry.actor == entry.payload["device"]

        # The hub's device table agrees, and telemetry from the new model arrives.
        async def telemetry_counted() -> list[dict[str, Any]]:
            while True:
                rows: list[dict[str, Any]] = await client.devices()
                if all((r["inferences"] or 0) > 0 for r in rows):
                    return rows
                await asyncio.sleep(0.2)

        rows = await asyncio.wait_for(telemetry_counted(), 30)
        assert [(r["device"], r["model"], r["version"], r["state"]) for r in rows] == [
            (d, "kws", "2", "applied") for d in devices
        ]

    # The ledger holds the story in order and verifies.
    store = LedgerStore.open(fleet.config.database_url())
    entries = list(store.iter_entries())
    kinds = [e.kind for e in entries]
    assert kinds[:2] == [ev.OPERATOR_ADDED, ev.OPERATOR_ADDED]  # the admin, the approver
    assert kinds[2:6] == [ev.MODEL_REGISTERED, ev.MODEL_VALIDATED, ev.MODEL_APPROVED,
                          ev.MODEL_RELEASED]
    assert kinds[6:9] == [ev.DEVICE_ENROLLED] * 3
    first_deploy = kinds.index(ev.DEPLOYMENT_CREATED)
    assert kinds[first_deploy + 1:first_deploy + 4] == [ev.DEVICE_ASSIGNED] * 3
    v2_registered = kinds.index(ev.MODEL_REGISTERED, 3)
    assert kinds[:v2_registered].count(ev.DEVICE_UPDATE_APPLIED) == 3
    assert kinds[v2_registered:].count(ev.DEVICE_UPDATE_APPLIED) == 3
    assert [e.seq for e in entries] == list(range(len(entries)))
    result = store.verify()
    assert result.ok and result.entries == len(entries)
    store.close()

    cli = run_ledger_cli("verify", "--db", fleet.config.database_url())
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert f"{len(entries)} entries" in cli.stdout

    # Edit one row with the sqlite3 module: verification names that seq.
    tampered = fleet.root / "tampered.db"
    victim = next(e for e in entries if e.kind == ev.DEVICE_UPDATE_APPLIED)
    with sqlite3.connect(fleet.config.database_url()) as live:  # WAL-aware copy
        con = sqlite3.connect(tampered)
        live.backup(con)
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        con.execute(f"DROP TRIGGER {name}")
    body = bytearray(victim.body)
    body[-1] ^= 0x01
    con.execute("UPDATE ledger_entries SET body = ? WHERE seq = ?", (bytes(body), victim.seq))
    con.commit()
    con.close()
    cli = run_ledger_cli("verify", "--db", str(tampered))
    assert cli.returncode == 1
    assert f"seq {victim.seq}" in cli.stdout + cli.stderr


async def test_blob_with_a_flipped_byte_is_refused_and_old_model_keeps_running(
    fleet: Fleet, model_files: dict[str, Path]
) -> None:
    async with await fleet.client(role="hub") as client:  # plays an attacker in NATS
        await fleet.release_model(model_files["1"], "kws", "1")
        await setup_devices(fleet, client, ["dev-0"])
        await deploy_and_wait(fleet, client, "1", ["dev-0"])
        v2 = await fleet.release_model(model_files["2"], "kws", "2")

        # The attacker rewrites the released blob devices read, keeping its name.
        data = bytearray(model_files["2"].read_bytes())
        data[len(data) // 2] ^= 0xFF
        obs = await client.nc.jetstream().object_store(RELEASES_BUCKET)
        await obs.put(v2["digest"], bytes(data))

        await client.call("deploy", {"model": "kws", "version": "2", "devices": ["dev-0"]})
        await fleet.feed.wait_for(
            lambda _: bool(fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, "dev-0")),
            what="the refusal to reach the ledger",
        )
        failure = fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, "dev-0")[0]
        assert "digest" in failure.payload["reason"]
        assert failure.payload["version"] == "2"

        rows = await client.devices()
        assert (rows[0]["model"], rows[0]["version"], rows[0]["state"]) == ("kws", "1", "failed")

    agent = fleet.agent("dev-0")
    assert agent.process is not None and agent.process.poll() is None, agent.log()
    active = SlotStore(agent.state_dir).active()
    assert active is not None and active.metadata["version"] == "1"
    assert active.path.read_bytes() == model_files["1"].read_bytes()


async def test_manifest_signed_by_a_key_outside_the_trust_root_is_refused(
    fleet: Fleet, model_files: dict[str, Path]
) -> None:
    async with await fleet.client(role="hub") as client:  # plays an attacker in NATS
        await fleet.release_model(model_files["1"], "kws", "1")
        await setup_devices(fleet, client, ["dev-0"])
        await deploy_and_wait(fleet, client, "1", ["dev-0"])

        # A rogue release key signs a manifest for an uploaded blob; the assignment
        # itself is validly signed, so only the manifest check stands in the way.
        digest, size = file_digest(model_files["3"])
        await (await client.nc.jetstream().object_store(RELEASES_BUCKET)).put(
            digest, model_files["3"].read_bytes())
        now = time.time_ns()
        manifest = proto.ReleaseManifest(
            name="kws", version="3", digest=digest, size=size, format="tflite",
            inputs=[], outputs=[], created=now, expires=now + 10**12,
        )
        rogue = SigningKey.generate()
        envelope = proto.SignedEnvelope.sign(
            manifest.to_map(), proto.DOMAIN_MANIFEST, [rogue]
        ).encode()
        js = client.nc.jetstream()
        await (await js.key_value(MANIFESTS_BUCKET)).put("kws.3", envelope)
        assignment = proto.Assignment(
            device="dev-0", model="kws", version="3", digest=digest,
            manifest_hash=blake3.blake3(envelope).hexdigest(), counter=2, rollout="attack",
            issued_at=now, expires=now + 10**12,
        )
        signed = proto.SignedEnvelope.sign(
            assignment.to_map(), proto.DOMAIN_ASSIGNMENT, [fleet.config.load_key("director")]
        )
        await (await js.key_value(ASSIGNMENTS_BUCKET)).put("dev-0", signed.encode())

        await fleet.feed.wait_for(
            lambda _: bool(fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, "dev-0")),
            what="the refusal to reach the ledger",
        )
    reason = fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, "dev-0")[0].payload["reason"]
    assert "release" in reason and "0 valid signature" in reason, reason
    active = SlotStore(fleet.agent("dev-0").state_dir).active()
    assert active is not None and active.metadata["version"] == "1"


async def test_agent_killed_and_restarted_comes_back_on_its_model_without_downloading(
    fleet: Fleet, model_files: dict[str, Path]
) -> None:
    async with await fleet.client() as client:
        await fleet.release_model(model_files["1"], "kws", "1")
        await setup_devices(fleet, client, ["dev-0"])
        await deploy_and_wait(fleet, client, "1", ["dev-0"])

    agent = fleet.agent("dev-0")
    slot = SlotStore(agent.state_dir).active()
    assert slot is not None
    before = os.stat(slot.path)
    applied_before = len(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, "dev-0"))

    agent.kill()
    reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    nc = await fleet.connect()

    async def on_report(msg: Any) -> None:
        await reports.put(proto.read_report(msg.data)[0].to_map())

    await nc.subscribe("fleet.report.dev-0.*", cb=on_report)
    agent.start()

    async def first_window_of_new_boot() -> dict[str, Any]:
        boot = None
        while True:
            report = await reports.get()
            if report["type"] == "status" and report["event"] == "started":
                boot = report["boot"]
                assert report["version"] == "1"
            elif report["type"] == "telemetry" and report["boot"] == boot and report["count"]:
                return report

    window = await asyncio.wait_for(first_window_of_new_boot(), 60)
    await nc.close()
    assert (window["model"], window["version"]) == ("kws", "1")
    assert window["digest"] == blake3.blake3(model_files["1"].read_bytes()).hexdigest()

    # Nothing was downloaded or installed again: same slot file, no new ledger event.
    after = os.stat(slot.path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, "dev-0")) == applied_before
    assert "already installed" in agent.log()
