"""Device-made keys (issue 12, class 9): a device makes its own key and enrols with a
one-time token, on a real nats-server (the `hub init` configuration, auth on) and a real
hub. The happy path goes through the CLIs (`hub device token create`, `edge-agent
keygen`, `edge-agent enroll`) and ends with the device installing a model; every
refusal is one line, counted, and leaves the ledger as it was."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError

from edge_agent import protocol as proto
from edge_agent.enrol import EnrolmentRefused, enrolment_request, send_request
from edge_agent.transport.connect import NatsAuth
from hub import events as ev
from hub.devices import tokens
from hub.devices.tokens import enrol_url
from hub.home.nats_config import auth_for
from ledger.signing import SigningKey
from tests.device_kit import configured_agent, deploy_and_wait
from tests.fleet import REPO_ROOT, Fleet, ledger_state
from tests.test_nats_permissions import Conn

pytestmark = pytest.mark.timeout(180)


async def cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A CLI in a child process, off the event loop (the hub in this process answers it)."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", module, *args], capture_output=True,
        text=True, timeout=60, cwd=REPO_ROOT,
        # The environment passes on: FLEET_CHECK_JSON_SCHEMAS (tests/conftest.py) makes
        # every --json document here checked against its schema.
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="200"))


async def new_token(fleet: Fleet, device: str, ttl_s: int = 3600) -> str:
    async with await fleet.client() as admin:
        result = await admin.call("device.token", {"device": device, "ttl_s": ttl_s})
    return str(result["token"])


async def ask(fleet: Fleet, data: bytes) -> dict[str, Any]:
    return await send_request(enrol_url(fleet.config), data, None, 10.0)


async def refused(fleet: Fleet, data: bytes, reason: str, words: str) -> None:
    """The request is refused with `words` in one line, counted under `reason`, and the
    ledger is as it was."""
    before, count = ledger_state(fleet), fleet.hub.enrolment.refused[reason]
    with pytest.raises(EnrolmentRefused, match=words) as info:
        await ask(fleet, data)
    assert "\n" not in str(info.value)
    assert ledger_state(fleet) == before and fleet.hub.store.verify().ok
    assert fleet.hub.enrolment.refused[reason] == count + 1


async def test_a_device_enrols_with_its_own_key_and_runs(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path,
) -> None:
    await fleet.release_model(model_files["1"], "kws", "1")
    home = str(fleet.config.home)
    made = await cli("hub.cli", "device", "token", "create", "dev-own", "--ttl", "15m", "--json",
               "--home", home, "--key", str(fleet.config.operator_key_path("admin")))
    assert made.returncode == 0, made.stderr
    answer = json.loads(made.stdout)
    token, url = answer["token"], answer["enrol_url"]
    assert url.startswith("nats://enrol:")
    # The ledger has the token's hash, never the token.
    await fleet.feed.wait_for(lambda _: bool(fleet.feed.of_kind(ev.DEVICE_TOKEN_CREATED)))
    created = fleet.feed.of_kind(ev.DEVICE_TOKEN_CREATED)[-1].payload
    assert created["token_hash"] == tokens.token_hash(token)
    assert token not in repr(created)

    bundle = tmp_path / "own-bundle"
    key = await cli("edge_agent.cli", "keygen", "--bundle", str(bundle), "--json")
    assert key.returncode == 0, key.stderr
    keyid = json.loads(key.stdout)["keyid"]
    assert (bundle / "device.key").stat().st_mode & 0o777 == 0o600
    again = await cli("edge_agent.cli", "keygen", "--bundle", str(bundle))
    assert again.returncode == 2 and "exists" in again.stderr  # never replaced silently

    enrolled = await cli("edge_agent.cli", "enroll", "--bundle", str(bundle), "--device-id",
                   "dev-own", "--token", token, "--hub", url, "--json")
    assert enrolled.returncode == 0, enrolled.stderr
    assert json.loads(enrolled.stdout)["keyid"] == keyid
    entry = fleet.feed.of_kind(ev.DEVICE_ENROLLED, "dev-own")[-1]
    assert entry.payload["token"] == created["token_id"]
    assert SigningKey.load(bundle / "device.key").public.raw == entry.payload["public"]
    assert entry.actor == SigningKey.load(fleet.config.operator_key_path("admin")).keyid
    assert not (fleet.bundle("dev-own") / "device.key").exists()  # no key in the hub home
    assert not any(token in repr(e.payload) for e in fleet.feed.entries)

    # Used once: the same token again is refused (the CLI: exit 1, one line).
    reused = await cli("edge_agent.cli", "enroll", "--bundle", str(bundle), "--device-id",
                 "dev-own", "--token", token, "--hub", url)
    assert reused.returncode == 1 and "used already" in reused.stderr
    assert len(reused.stderr.strip().splitlines()) == 1

    # The bundle it wrote runs the device: its own key is its NATS identity.
    agent = configured_agent(fleet, "dev-own")
    agent.bundle = bundle
    agent.start()
    async with await fleet.client() as admin:
        await deploy_and_wait(fleet, admin, "1", ["dev-own"])


async def test_each_bad_request_is_refused_counted_and_not_recorded(fleet: Fleet) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    token = await new_token(fleet, "dev-t")
    # Unknown token, a token of another device, a forged signature, garbage.
    await refused(fleet, enrolment_request("dev-t", key, "not-a-token"),
                  tokens.UNKNOWN_TOKEN, "unknown enrolment token")
    other_token = await new_token(fleet, "dev-u")
    await refused(fleet, enrolment_request("dev-t", key, other_token),
                  tokens.OTHER_DEVICE, "not for device dev-t")
    await refused(fleet, enrolment_request("dev-u", key, token),
                  tokens.OTHER_DEVICE, "not for device dev-u")
    signed_by_other = proto.SignedEnvelope.sign(
        proto.EnrolmentRequest("dev-t", key.public.raw, token, time.time_ns()).to_map(),
        proto.DOMAIN_ENROLMENT, [other]).encode()
    await refused(fleet, signed_by_other, tokens.BAD_SIGNATURE, "not signed by the key")
    await refused(fleet, b"\xc1garbage", tokens.MALFORMED, "malformed request")

    # A key another device already holds (the existing collision rule).
    async with await fleet.client() as admin:
        await admin.call("device.enroll", {"device": "dev-a"})
    taken = SigningKey.load(fleet.bundle("dev-a") / "device.key")
    await refused(fleet, enrolment_request("dev-t", taken, token), tokens.KEY_IN_USE,
                  "already the key of device dev-a")

    # Expired: the hub's clock moved past the token's expiry.
    real = fleet.hub.enrolment.clock
    fleet.hub.enrolment.clock = lambda: real() + 2 * 3600 * 10**9
    try:
        await refused(fleet, enrolment_request("dev-t", key, token), tokens.EXPIRED,
                      "has expired")
    finally:
        fleet.hub.enrolment.clock = real

    # The token still works after all that; then it is used.
    result = await ask(fleet, enrolment_request("dev-t", key, token))
    assert result["device"] == "dev-t" and "private" not in repr(result).lower()
    assert set(result) == {"device", "keyid", "seq", "nats_url", "trust_root", "ca"}
    await refused(fleet, enrolment_request("dev-t", other, token), tokens.USED,
                  "used already")
    # A token whose device was enrolled another way meanwhile.
    late = await new_token(fleet, "dev-v")
    async with await fleet.client() as admin:
        await admin.call("device.enroll", {"device": "dev-v"})
    await refused(fleet, enrolment_request("dev-v", other, late), tokens.ENROLLED,
                  "already enrolled")
    async with await fleet.client() as admin:
        status = await admin.call("status", {})
    assert status["refused_enrolments"][tokens.USED] >= 1


async def test_token_create_refuses_an_enrolled_device(fleet: Fleet) -> None:
    async with await fleet.client() as admin:
        await admin.call("device.enroll", {"device": "dev-e"})
    made = await cli("hub.cli", "device", "token", "create", "dev-e", "--home",
               str(fleet.config.home), "--key", str(fleet.config.operator_key_path("admin")))
    assert made.returncode == 1 and "already enrolled" in made.stderr
    bad_ttl = await cli("hub.cli", "device", "token", "create", "dev-x", "--ttl", "soon",
                  "--home", str(fleet.config.home))
    assert bad_ttl.returncode == 2 and "--ttl" in bad_ttl.stderr


async def test_the_enrol_user_can_only_ask_to_enrol(fleet: Fleet) -> None:
    """The shared `enrol` password is public in effect: it reaches `hub.enrol`, nothing
    else (no JetStream API, no operator API, no reports, no other subscriptions)."""
    password = auth_for(fleet.config.home, "enrol").password
    conn = await Conn.open(fleet.nats_url, NatsAuth(
        user="enrol", password=password, inbox_prefix="_INBOX_ENROL.test"), "enrol")
    try:
        for subject in ("$JS.API.STREAM.INFO.KV_assignments", "hub.api.status",
                        "fleet.report.dev-a.status", "ledger.api.checkpoint"):
            await conn.refused(subject, conn.nc.publish(subject, b"{}"))
        await conn.refused("ledger.entry", conn.nc.subscribe("ledger.entry"))
        await conn.refused("_INBOX.x", conn.nc.subscribe("_INBOX.x"))
        # A good request whose answer is aimed at a hub subject: it comes through the
        # ENROL account's import, so the hub sees the server's `_R_.` reply and the
        # answer is delivered back in ENROL (class 2): the enrolment is the token's to
        # make, and nothing lands in the hub's `$KV.assignments.dev-r`.
        token = await new_token(fleet, "dev-r")
        await conn.nc.publish(proto.ENROL_SUBJECT, enrolment_request(
            "dev-r", SigningKey.generate(), token), reply="$KV.assignments.dev-r")
        await fleet.feed.wait_for(
            lambda _: any(e.subject == "device:dev-r"
                          for e in fleet.feed.of_kind(ev.DEVICE_ENROLLED)),
            what="dev-r enrolled through the ENROL account")
        kv = await fleet.hub.edge.js.key_value("assignments")
        with pytest.raises(KeyNotFoundError):
            await kv.get("dev-r")
    finally:
        await conn.close()
