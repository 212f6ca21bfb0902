"""Trust-root rotation end to end: real NATS, the hub, agent processes, the `hub` CLI.

A rotation adds a key (root N+1 signed by the old and the new root keys), a revocation
removes one and re-signs what it signed; agents walk the chain of roots from the one
pinned at enrolment and refuse a root the old keys alone vouch for.
"""

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
from edge_agent.protocol.names import ROOT_LATEST_KEY, ROOTS_BUCKET, root_key
from edge_agent.trust.chain import root_document, sign_root
from edge_agent.trust.root import TrustRoot
from hub import events as ev
from hub.client import HubClient
from ledger.signing import SigningKey
from tests.device_kit import (
    ReportWatch,
    deploy_and_wait,
    forge_assignment,
    last_assigned,
    put_assignment,
)
from tests.fleet import REPO_ROOT, Fleet

pytestmark = pytest.mark.timeout(120)

DEVICE = "dev-0"
HOUR = 3600 * 10**9


@pytest.fixture
async def running(fleet: Fleet, model_files: dict[str, Path]) -> AsyncIterator[HubClient]:
    """dev-0 enrolled (bundle pinned to root 1), running kws/1; kws/2 released too."""
    await fleet.release_model(model_files["1"], "kws", "1")
    await fleet.release_model(model_files["2"], "kws", "2")
    async with await fleet.client(role="hub") as client:  # it forges assignments
        await client.call("device.enroll", {"device": DEVICE})
        fleet.agent(DEVICE).start()
        await deploy_and_wait(fleet, client, "1", [DEVICE])
        yield client


def signer_ids(envelope: bytes) -> set[str]:
    return {s.keyid for s in proto.SignedEnvelope.decode(envelope).signatures}


def stored_root_version(fleet: Fleet) -> int:
    path = fleet.agent(DEVICE).state_dir / "trust-root.bin"
    return TrustRoot.load(path).version if path.exists() else 1


async def failure_with(fleet: Fleet, words: str, after: int) -> str:
    await fleet.feed.wait_for(
        lambda _: any(words in str(e.payload["reason"])
                      for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE)[after:]),
        what=f"a failure report with {words!r}",
    )
    return str(fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE)[-1].payload["reason"])


async def test_director_rotation_then_revocation(fleet: Fleet, running: HubClient) -> None:
    client = running
    old = fleet.config.load_key("director")

    rotated = await client.call("keys.rotate", {"role": "director"})
    assert rotated["version"] == 2 and rotated["role"] == "director"
    new_id = rotated["keyid"]
    assert (fleet.config.home / "keys" / rotated["key_file"]).stat().st_mode & 0o777 == 0o600
    entry = fleet.feed.of_kind(ev.KEYS_ROTATED)[-1]
    assert entry.payload["version"] == 2 and entry.actor == fleet.admin_key.keyid
    assert TrustRoot.load(fleet.config.trust_root_path).version == 2

    # From now on the hub signs with the new key; the agent walks to root 2 to accept it.
    await deploy_and_wait(fleet, client, "2", [DEVICE])
    assert signer_ids(last_assigned(fleet, DEVICE).payload["assignment"]) == {new_id}
    assert stored_root_version(fleet) == 2

    # Revoke the old key: root 3, and the current assignment is re-signed (next counter).
    counter = last_assigned(fleet, DEVICE).payload["counter"]
    revoked = await client.call("keys.revoke", {"keyid": old.keyid})
    assert revoked["version"] == 3
    assert revoked["resigned_assignments"] == 1 and revoked["resigned_manifests"] == 0
    resigned = last_assigned(fleet, DEVICE)
    assert resigned.payload["counter"] == counter + 1 and resigned.payload["resigned"] is True
    assert signer_ids(resigned.payload["assignment"]) == {new_id}
    await fleet.feed.wait_for(
        lambda _: any(e.payload["counter"] == counter + 1
                      for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)),
        what="the device to apply the re-signed assignment",
    )
    assert stored_root_version(fleet) == 3
    assert not (fleet.config.home / "keys" / "director.key").exists()

    # Anything the revoked key signs is refused now, however high its counter.
    failures = len(fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE))
    manifest = fleet.feed.of_kind(ev.MODEL_RELEASED)[-1].payload["manifest"]
    forged = forge_assignment(old, DEVICE, manifest, counter=counter + 50)
    js = client.nc.jetstream()
    await put_assignment(js, DEVICE, forged)
    reason = await failure_with(fleet, "0 valid signature(s) from the director role", failures)
    assert old.keyid in reason
    assert fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)[-1].payload["version"] == "2"

    # ...and new deployments still go through, signed by the remaining key.
    await deploy_and_wait(fleet, client, "1", [DEVICE])


async def test_release_key_revocation_re_signs_live_manifests(
    fleet: Fleet, running: HubClient
) -> None:
    client = running
    old = fleet.config.load_key("release")
    new_id = (await client.call("keys.rotate", {"role": "release"}))["keyid"]
    result = await client.call("keys.revoke", {"keyid": old.keyid})
    assert result["resigned_manifests"] == 2 and result["resigned_assignments"] == 1
    resigned = fleet.feed.of_kind(ev.MODEL_RESIGNED)
    assert sorted(e.payload["version"] for e in resigned) == ["1", "2"]
    assert all(signer_ids(e.payload["manifest"]) == {new_id} for e in resigned)
    # The device installs the re-signed assignment naming the re-signed manifest...
    counter = last_assigned(fleet, DEVICE).payload["counter"]
    await fleet.feed.wait_for(
        lambda _: any(e.payload["counter"] == counter
                      for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)),
        what="the device to apply the re-signed assignment",
    )
    # ...and a fresh deployment uses the re-signed kws/2 manifest.
    await deploy_and_wait(fleet, client, "2", [DEVICE])
    assert last_assigned(fleet, DEVICE).payload["manifest_hash"] == resigned[-1].payload[
        "manifest_hash"]


async def test_revoking_the_last_key_of_a_role_is_refused(
    fleet: Fleet, running: HubClient
) -> None:
    from hub.errors import HubError

    old = fleet.config.load_key("director")
    with pytest.raises(HubError, match="without keys; run `hub keys rotate director` first"):
        await running.call("keys.revoke", {"keyid": old.keyid})
    with pytest.raises(HubError, match="threshold 3"):
        await running.call("keys.rotate", {"role": "director", "threshold": 3})
    assert not fleet.feed.of_kind(ev.KEYS_REVOKED) and not fleet.feed.of_kind(ev.KEYS_ROTATED)


async def test_root_signed_by_the_old_keys_only_is_refused_by_the_agent(
    fleet: Fleet, running: HubClient
) -> None:
    old_root = fleet.config.load_key("root")
    current = TrustRoot.load(fleet.config.trust_root_path)
    new_root, rogue_director = SigningKey.generate(), SigningKey.generate()
    publics = {role: [current.keys[k] for k in spec.keyids]
               for role, spec in current.roles.items()}
    publics["root"] = [new_root.public]
    publics["director"] = [rogue_director.public]
    doc = root_document(publics, {}, 2, time.time_ns() + HOUR)
    data = sign_root(doc, [old_root]).encode()  # the new root key did not sign

    watch = await ReportWatch.start(fleet.url_as(), DEVICE)
    try:
        failures = len(fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE))
        kv = await running.nc.jetstream().key_value(ROOTS_BUCKET)
        await kv.put(root_key(2), data)
        await kv.put(ROOT_LATEST_KEY, data)
        reason = await failure_with(fleet, "root rotation signed by the old keys only",
                                    failures)
        assert "root 2" in reason
        # Still on root 1: an assignment from the rogue director key is refused too.
        assert stored_root_version(fleet) == 1
        manifest = fleet.feed.of_kind(ev.MODEL_RELEASED)[-1].payload["manifest"]
        await put_assignment(running.nc.jetstream(), DEVICE,
                             forge_assignment(rogue_director, DEVICE, manifest, counter=99))
        await failure_with(fleet, "0 valid signature(s) from the director role",
                           failures + 1)
        agent = fleet.agent(DEVICE)
        assert agent.process is not None and agent.process.poll() is None
        assert fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)[-1].payload[
            "version"] == "1"
    finally:
        await watch.close()


async def hub_cli(fleet: Fleet, *args: str) -> tuple[int, str]:
    """Run `python -m hub.cli ARGS --home HOME` without blocking the in-process hub."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="300")
    env.pop("FLEET_HUB_HOME", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", *args, "--home", str(fleet.config.home),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        cwd=REPO_ROOT.parent,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_cli_flow_show_rotate_show(fleet: Fleet, running: HubClient) -> None:
    code, text = await hub_cli(fleet, "keys", "show")
    assert code == 0, text
    assert "trust root version 1" in text
    director = fleet.config.load_key("director").keyid
    assert director in text and "director" in text

    code, text = await hub_cli(fleet, "keys", "rotate", "director")
    assert code == 0, text
    assert "trust root version 2: new director key" in text

    code, text = await hub_cli(fleet, "keys", "show", "--json")
    assert code == 0, text
    shown = json.loads(text)
    assert shown["version"] == 2
    roles = {r["role"]: r for r in shown["roles"]}
    assert len(roles["director"]["keyids"]) == 2 and roles["director"]["threshold"] == 1
    code, text = await hub_cli(fleet, "keys", "show")
    assert "trust root version 2" in text

    # The device follows: root 2 is in its state dir once it sees the next assignment.
    await deploy_and_wait(fleet, running, "2", [DEVICE])
    assert stored_root_version(fleet) == 2

    code, text = await hub_cli(fleet, "keys", "revoke", "0" * 32)
    assert code == 1 and "is in no role" in text, text
