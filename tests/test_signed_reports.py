"""Signed device reports (Uptane's signed version report): each device signs its status
reports with the key made at enrolment; the hub refuses anything else and keeps the
signed report in the ledger, where `hub device history` checks it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent import protocol as proto
from edge_agent.bundle import DeviceBundle
from hub import events as ev
from hub.client import HubClient
from ledger.signing import SigningKey
from tests.device_kit import configured_agent, deploy_and_wait
from tests.fleet import REPO_ROOT, Fleet

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[HubClient]:
    # As the hub's NATS user: these tests publish forged reports in devices' names.
    async with await fleet.client(role="hub") as c:
        yield c


def report(device: str, seq: int = 1) -> proto.StatusReport:
    return proto.StatusReport(
        device=device, boot="boot-1", seq=seq, ts=time.time_ns(), event=proto.STATUS_APPLIED,
        model="kws", version="1", digest="ab" * 32, counter=1, reason="", probe_output=[0.5],
    )


async def refused_reports(client: HubClient, at_least: int) -> int:
    async def until() -> int:
        while (n := int((await client.call("status"))["refused_reports"])) < at_least:
            await asyncio.sleep(0.05)
        return n

    return await asyncio.wait_for(until(), 20)


async def test_enrolment_writes_the_device_bundle(fleet: Fleet, client: HubClient) -> None:
    result = await client.call("device.enroll", {"device": "dev-a"})
    bundle = DeviceBundle.load(Path(result["bundle"]))
    assert (bundle.device_id, bundle.nats_url) == ("dev-a", fleet.nats_url)
    assert bundle.device_key is not None and bundle.device_key.stat().st_mode & 0o777 == 0o600
    assert bundle.trust_root.read_bytes() == fleet.config.trust_root_path.read_bytes()
    key = SigningKey.load(bundle.device_key)
    enrolled = fleet.feed.of_kind(ev.DEVICE_ENROLLED)[-1]
    assert enrolled.payload["public"] == key.public.raw and result["keyid"] == key.keyid

    # A device that keeps its own key enrolls with the public half only.
    own = SigningKey.generate()
    result = await client.call("device.enroll", {"device": "dev-b", "public": own.public.raw})
    assert DeviceBundle.load(Path(result["bundle"])).device_key is None
    assert fleet.feed.of_kind(ev.DEVICE_ENROLLED)[-1].payload["public"] == own.public.raw


async def test_unsigned_and_wrongly_signed_reports_are_refused(
    fleet: Fleet, client: HubClient
) -> None:
    for device in ("dev-a", "dev-b"):
        await client.call("device.enroll", {"device": device})
    key_a = SigningKey.load(fleet.bundle("dev-a") / "device.key")
    key_b = SigningKey.load(fleet.bundle("dev-b") / "device.key")
    before = fleet.hub.store.count()
    refused = int((await client.call("status"))["refused_reports"])
    js = client.nc.jetstream()
    await js.publish("fleet.report.dev-a.status", proto.encode_report(report("dev-a")))
    await js.publish("fleet.report.dev-a.status",
                     proto.encode_signed_report(report("dev-a", 2), key_b))
    await js.publish("fleet.report.dev-a.status", proto.encode_signed_report(
        report("dev-a", 3), SigningKey.generate()))
    assert await refused_reports(client, refused + 3) == refused + 3
    assert fleet.hub.store.count() == before
    assert (await client.devices())[0]["state"] == "enrolled"

    # The same report signed by dev-a's own key is taken, with the signed bytes kept.
    signed = proto.encode_signed_report(report("dev-a", 4), key_a)
    await js.publish("fleet.report.dev-a.status", signed)
    await fleet.feed.wait_for(lambda _: bool(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED)),
                              what="dev-a's signed report to reach the ledger")
    entry = fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED)[-1]
    assert entry.actor == "dev-a" and entry.payload["report"] == signed
    assert (await client.call("status"))["refused_reports"] == refused + 3


async def hub_cli(fleet: Fleet, *args: str) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="300")
    env.pop("FLEET_HUB_HOME", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", *args, "--home", str(fleet.config.home),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        cwd=REPO_ROOT.parent,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_device_history_shows_valid_signatures_of_a_real_agent(
    fleet: Fleet, client: HubClient, model_files: dict[str, Path]
) -> None:
    await fleet.release_model(model_files["1"], "kws", "1")
    await client.call("device.enroll", {"device": "dev-0"})
    fleet.agent("dev-0").start()
    await deploy_and_wait(fleet, client, "1", ["dev-0"])

    code, text = await hub_cli(fleet, "device", "history", "dev-0", "--json")
    assert code == 0, text
    rows = json.loads(text)
    applied = [r for r in rows if r["event"] == ev.DEVICE_UPDATE_APPLIED]
    assert len(applied) == 1 and applied[0]["signature"] == "valid"
    assert (applied[0]["model"], applied[0]["version"]) == ("kws", "1")
    assert len(applied[0]["digest"]) == 64  # full, not the table's 16 digits
    assert [r["event"] for r in rows][:2] == [ev.DEVICE_ENROLLED, ev.DEVICE_ASSIGNED]
    code, text = await hub_cli(fleet, "device", "history", "dev-0")
    assert code == 0 and "valid" in text and "kws/1" in text, text


async def test_an_agent_without_a_device_key_is_refused_by_the_nats_server(
    fleet: Fleet, client: HubClient
) -> None:
    """Without its device key an agent has no NATS identity (the key is its nkey): the
    server refuses it at connect. (Unsigned reports that reach the hub anyway are refused
    there: the test above.)"""
    await client.call("device.enroll", {"device": "dev-0"})
    agent = configured_agent(fleet, "dev-0")
    agent.bundle = None  # explicit flags, no --device-key: no NATS identity either
    agent.start()
    deadline = time.monotonic() + 60
    while "authorization violation" not in agent.log().lower():  # it keeps knocking
        assert time.monotonic() < deadline, agent.log()[-2000:]
        await asyncio.sleep(0.1)
    assert not (await client.devices())[0]["last_seen"]
