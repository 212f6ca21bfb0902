"""Freshness (issue 12, class 5): the signed timestamp, end to end.

A device kept away from the hub through a director-key revocation used to install an
assignment signed by the revoked key: nothing told it that its trust root was stale.
Here the device is shown a stale mirror of the hub's buckets (a second nats-server, the
attacker's, holding the revoked key): first with the timestamp withheld, then with the
hub's genuine fresh timestamp but without the newer roots. It installs nothing, says
why once per reason, keeps running its model, records nothing; back on the real hub it
catches up and installs the re-signed assignment. Real nats-servers, real hub, the
agent as a child process. The pure rules are in tests/test_update_policy.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import blake3
import pytest
from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError

from edge_agent import protocol as proto
from edge_agent.protocol.names import (
    ASSIGNMENTS_BUCKET,
    MANIFESTS_BUCKET,
    MODELS_BUCKET,
    RELEASES_BUCKET,
    ROOT_LATEST_KEY,
    ROOTS_BUCKET,
    TIMESTAMP_KEY,
    root_key,
)
from edge_agent.slots import SlotStore
from edge_agent.transport.connect import connect as nats_connect
from edge_agent.trust.chain import verify_next_root
from edge_agent.trust.root import TrustRoot
from edge_agent.update import Counters, check_assignment, check_timestamp
from hub import events as ev
from hub.keys.keyring import KeyChangeRefused, plan_next_root
from hub.keys.timestamps import read_timestamp
from ledger.signing import SigningKey
from testkit.nats_server import EmbeddedNats
from tests.device_kit import (
    ReportWatch,
    configured_agent,
    deploy_and_wait,
    forge_assignment,
    last_assigned,
)
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(240)

DEVICE = "dev-f"


async def kv_get(fleet: Fleet, bucket: str, key: str) -> bytes | None:
    nc = await fleet.connect("hub", name="test-kv-read")
    try:
        kv = await nc.jetstream().key_value(bucket)
        try:
            return (await kv.get(key)).value
        except KeyNotFoundError:
            return None
    finally:
        await nc.close()


async def wait_timestamp(fleet: Fleet, root_version: int) -> proto.Timestamp:
    """The hub's timestamp in KV, once it names `root_version`."""
    async def until() -> proto.Timestamp:
        while True:
            data = await kv_get(fleet, ROOTS_BUCKET, TIMESTAMP_KEY)
            if data is not None and read_timestamp(data).root_version == root_version:
                return read_timestamp(data)
            await asyncio.sleep(0.2)

    return await asyncio.wait_for(until(), 30)


def installed(state_dir: Path) -> tuple[str, int]:
    active = SlotStore(state_dir).active()
    assert active is not None
    last = json.loads((state_dir / "agent.json").read_text())["last_counter"]
    return str(active.metadata["version"]), int(last)


async def test_a_device_behind_a_stale_mirror_refuses_the_revoked_key_then_catches_up(
    fleet: Fleet, model_files: dict[str, Path], bare_nats_server: EmbeddedNats,
) -> None:
    mirror_url = bare_nats_server.url
    await fleet.release_model(model_files["1"], "kws", "1")
    await fleet.release_model(model_files["2"], "kws", "2")
    agent = configured_agent(fleet, DEVICE)
    async with await fleet.client(role="hub") as client:
        await client.call("device.enroll", {"device": DEVICE})
        first = await wait_timestamp(fleet, 1)  # the hub signs one at start
        agent.start()
        await deploy_and_wait(fleet, client, "1", [DEVICE])
        assert installed(agent.state_dir) == ("1", 1)
        assert (agent.state_dir / "timestamp.bin").exists()  # accepted, kept on disk
        agent.stop()  # the device goes offline

        # While it is away: the director key is rotated, then the old one revoked
        # (root 3); live assignments are re-signed with the new key.
        old_director = fleet.config.load_key("director")
        await client.call("keys.rotate", {"role": "director"})
        await client.call("keys.revoke", {"keyid": old_director.keyid})
        fresh = await wait_timestamp(fleet, 3)  # re-signed at once for the new root
        assert fresh.version > first.version
        resigned = last_assigned(fleet, DEVICE).payload
        assert resigned["resigned"] is True and resigned["counter"] == 2

    # The attacker's stale mirror: root 1 only (the device's), kws/2 with its manifest
    # and blob, and an assignment to it signed by the revoked director key. Without the
    # timestamp check every byte of this verifies against root 1.
    manifest = await kv_get(fleet, MANIFESTS_BUCKET, "kws.2")
    assert manifest is not None
    digest = proto.SignedEnvelope.decode(manifest).document("manifest")["digest"]
    hub_nc = await fleet.connect("hub", name="test-copy")
    blob = (await (await hub_nc.jetstream().object_store(MODELS_BUCKET)).get(digest)).data
    await hub_nc.close()
    root1 = (fleet.config.home / "roots" / "root.1.bin").read_bytes()
    forged = forge_assignment(old_director, DEVICE, manifest, counter=50)
    # The attack is real: against root 1 the forged assignment is authentic and new.
    trust1 = TrustRoot.from_envelope(proto.SignedEnvelope.decode(root1), allow_expired=True)
    assert check_assignment(trust1, DEVICE, Counters(last=1), forged) is not None
    mirror_nc = await nats_connect(mirror_url, name="test-mirror")
    js = mirror_nc.jetstream()
    # As the hub makes them: devices read with direct gets (allow_direct).
    roots = await js.create_key_value(KeyValueConfig(bucket=ROOTS_BUCKET, history=1,
                                                     direct=True))
    await roots.put(root_key(1), root1)
    await roots.put(ROOT_LATEST_KEY, root1)
    manifests = await js.create_key_value(KeyValueConfig(bucket=MANIFESTS_BUCKET, history=1,
                                                         direct=True))
    await manifests.put("kws.2", manifest)
    assert isinstance(blob, bytes) and blake3.blake3(blob).hexdigest() == digest
    await (await js.create_object_store(RELEASES_BUCKET)).put(digest, blob)
    objects_stream = (await js.stream_info(f"OBJ_{RELEASES_BUCKET}")).config
    objects_stream.allow_direct = True
    await js.update_stream(objects_stream)
    assignments = await js.create_key_value(
        KeyValueConfig(bucket=ASSIGNMENTS_BUCKET, history=1, direct=True))
    await assignments.put(DEVICE, forged)
    # The mirror acknowledges reports (else the spool would wait on the first one), so
    # what the device says reaches the test here.
    await js.add_stream(name="REPORTS", subjects=["fleet.report.>"])
    watch = await ReportWatch.start(mirror_url, DEVICE)
    try:
        # 1. Timestamp withheld: held back, said once, nothing recorded.
        agent.nats_url = mirror_url
        agent.start()
        held = await watch.wait_for(
            lambda r: isinstance(r, proto.StatusReport) and "held back" in r.reason,
            what="the forged assignment held back")
        assert isinstance(held, proto.StatusReport)
        assert "no timestamp published" in held.reason and held.counter == 50
        assert "keeps running" in held.reason

        # 2. The hub's genuine, fresh timestamp, but the newer roots withheld: the
        # device learns that a newer root exists and still refuses (its retry loop).
        await roots.put(TIMESTAMP_KEY, await kv_get(fleet, ROOTS_BUCKET, TIMESTAMP_KEY)
                        or b"")
        rotated = await watch.wait_for(
            lambda r: isinstance(r, proto.StatusReport)
            and "names trust root 3 but this device holds 1" in r.reason,
            timeout=60, what="the withheld rotation noticed")
        assert isinstance(rotated, proto.StatusReport) and rotated.counter == 50
        # Once per reason: the withheld-timestamp refusal was not said again.
        said = [r for r in watch.reports if isinstance(r, proto.StatusReport)
                and "no timestamp published" in r.reason]
        assert len(said) == 1
        agent.stop()
        assert installed(agent.state_dir) == ("1", 1)  # kws/1 ran throughout
    finally:
        await watch.close()
        await mirror_nc.close()

    # Back on the real hub: the chain walk reaches root 3, the timestamp names it, and
    # the re-signed assignment (new key, same bytes) is installed; counter 50 never was.
    agent.nats_url = fleet.nats_url
    agent.start()
    await fleet.feed.wait_for(
        lambda _: any(e.payload["counter"] == 2
                      for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)),
        timeout=60, what="the re-signed assignment applied")
    assert installed(agent.state_dir) == ("1", 2)
    assert read_timestamp((agent.state_dir / "timestamp.bin").read_bytes()).version >= (
        fresh.version)
    assert not any(e.payload["counter"] == 50
                   for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE))


async def test_a_deleted_timestamp_is_put_back(fleet: Fleet) -> None:
    before = await wait_timestamp(fleet, 1)
    nc = await fleet.connect("hub", name="test-delete")
    try:
        await (await nc.jetstream().key_value(ROOTS_BUCKET)).delete(TIMESTAMP_KEY)
    finally:
        await nc.close()
    fleet.hub.reconciler.nudge()
    after = await wait_timestamp(fleet, 1)
    assert after.version >= before.version
    assert fleet.hub.supervisor.states()  # the timestamp task runs supervised
    assert any(s["name"] == "timestamp" and s["state"] == "running"
               for s in fleet.hub.supervisor.states())


async def test_the_timestamp_key_rotates_and_revokes_through_the_root_chain(
    fleet: Fleet) -> None:
    first = await wait_timestamp(fleet, 1)
    old = fleet.config.load_key("timestamp")
    async with await fleet.client() as admin:
        rotated = await admin.call("keys.rotate", {"role": "timestamp"})
        after_rotation = await wait_timestamp(fleet, 2)
        await admin.call("keys.revoke", {"keyid": old.keyid})
    revoked = await wait_timestamp(fleet, 3)
    assert first.version < after_rotation.version < revoked.version
    data = await kv_get(fleet, ROOTS_BUCKET, TIMESTAMP_KEY)
    assert data is not None
    signers = {s.keyid for s in proto.SignedEnvelope.decode(data).signatures}
    assert signers == {rotated["keyid"]}  # the new key only, never the revoked one
    # What a device walking to root 3 checks: it verifies against that root.
    root3 = TrustRoot.from_envelope(proto.SignedEnvelope.decode(
        (fleet.config.home / "roots" / "root.3.bin").read_bytes()))
    assert check_timestamp(root3, data, first.version) is not None


def test_a_root_without_the_timestamp_role_gets_it_by_rotation() -> None:
    """Homes made before the role: `hub keys rotate timestamp` adds it (root N+1, signed
    by the old and new root keys like any rotation)."""
    keys = {role: SigningKey.generate() for role in ("root", "release", "director", "log")}
    old = TrustRoot.from_envelope(TrustRoot.build({r: [k] for r, k in keys.items()}))
    assert "timestamp" not in old.roles
    new_key = SigningKey.generate()
    change = plan_next_root(old, list(keys.values()), "timestamp", add=new_key)
    new = verify_next_root(old, change.root.encode())
    assert new.roles["timestamp"].keyids == (new_key.keyid,)
    with pytest.raises(KeyChangeRefused, match="no role 'nonsense'"):
        plan_next_root(old, list(keys.values()), "nonsense", add=new_key)
