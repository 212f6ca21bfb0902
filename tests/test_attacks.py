"""The attacks TUF and Uptane name, each mounted by someone with write access to NATS.

The attacker writes straight into the KV buckets and the Object Store (no hub command
involved), with keys from the hub home where the attack is "the wrong key for this
document", or with fresh rogue keys. For every attack the device must install nothing,
keep running and serving its current model, and report why, so that the refusal ends up
in the ledger as `device.update_failed` with a reason naming the problem. (Signatures
below a role's threshold are covered by the unit tests in tests/test_trust.py.)
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
from nats.js import JetStreamContext

from edge_agent import protocol as proto
from edge_agent.protocol.names import RELEASES_BUCKET
from edge_agent.update import EXPIRY_SKEW_NS
from hub import events as ev
from hub.client import HubClient
from ledger.signing import SigningKey
from tests.device_kit import (
    HOUR_NS,
    ReportWatch,
    deploy_and_wait,
    forge_assignment,
    forge_manifest,
    last_assigned,
    put_assignment,
    put_manifest,
    slot_snapshot,
)
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(60)

DEVICE = "dev-0"


@dataclass
class Target:
    """dev-0 running kws/1 (counter 1), and what an attacker on NATS can reach."""

    fleet: Fleet
    client: HubClient
    js: JetStreamContext
    reports: ReportWatch
    model_files: dict[str, Path]
    digest: str  # of the model the device runs

    @property
    def state_dir(self) -> Path:
        return self.fleet.agent(DEVICE).state_dir

    async def expect_refusal(self, *words: str) -> str:
        """The attack fails: reported, recorded, nothing installed, old model still serving."""
        failures_before = len(self.fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE))
        installed = slot_snapshot(self.state_dir)
        await self.fleet.feed.wait_for(
            lambda _: len(self.fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE))
            > failures_before,
            what="the refusal to reach the ledger",
        )
        reason = str(self.fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE)[-1]
                     .payload["reason"])
        for word in words:
            assert word in reason, reason
        # Still alive and still serving the old model, after the attack.
        await self.reports.telemetry_of(self.digest, after=self.reports.mark())
        agent = self.fleet.agent(DEVICE)
        assert agent.process is not None and agent.process.poll() is None, agent.log()
        assert slot_snapshot(self.state_dir) == installed
        assert self.fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)[-1].payload[
            "digest"] == self.digest
        return reason

    async def upload(self, data: bytes) -> tuple[str, int]:
        """Put a blob straight into the bucket devices read (the attacker holds the hub's
        NATS rights here)."""
        digest = blake3.blake3(data).hexdigest()
        await (await self.js.object_store(RELEASES_BUCKET)).put(digest, data)
        return digest, len(data)


@pytest.fixture
async def target(fleet: Fleet, model_files: dict[str, Path]) -> AsyncIterator[Target]:
    await fleet.release_model(model_files["1"], "kws", "1")
    async with await fleet.client(role="hub") as client:  # it forges KV entries
        await client.call("device.enroll", {"device": DEVICE})
        reports = await ReportWatch.start(fleet.url_as(), DEVICE)
        fleet.agent(DEVICE).start()
        await deploy_and_wait(fleet, client, "1", [DEVICE])
        digest = blake3.blake3(model_files["1"].read_bytes()).hexdigest()
        try:
            yield Target(fleet, client, client.nc.jetstream(), reports, model_files, digest)
        finally:
            await reports.close()


def director(t: Target) -> SigningKey:
    return t.fleet.config.load_key("director")


def release(t: Target) -> SigningKey:
    return t.fleet.config.load_key("release")


async def staged_v3(
    t: Target, key: SigningKey | None = None, expires_in_ns: int = HOUR_NS
) -> bytes:
    """Upload kws/3 and put a manifest for it (signed by `key`, default the release key)."""
    digest, size = await t.upload(t.model_files["3"].read_bytes())
    manifest = forge_manifest(key or release(t), digest, size, expires_in_ns=expires_in_ns)
    await put_manifest(t.js, manifest)
    return manifest


# ---------------------------------------------------------------- arbitrary software


async def test_arbitrary_software_assignment_with_a_bad_signature(target: Target) -> None:
    manifest = await staged_v3(target)
    genuine = proto.SignedEnvelope.decode(
        forge_assignment(director(target), DEVICE, manifest, counter=2)
    )
    sig = genuine.signatures[0]
    broken = bytes([sig.sig[0] ^ 0x01]) + sig.sig[1:]
    envelope = proto.SignedEnvelope(genuine.signed, (proto.Signature(sig.keyid, broken),))
    await put_assignment(target.js, DEVICE, envelope.encode())
    await target.expect_refusal("assignment", "0 valid signature", "director")


async def test_arbitrary_software_assignment_signed_by_a_rogue_key(target: Target) -> None:
    rogue = SigningKey.generate()
    manifest = await staged_v3(target, key=rogue)
    await put_assignment(target.js, DEVICE, forge_assignment(rogue, DEVICE, manifest, counter=2))
    await target.expect_refusal("assignment", "0 valid signature", "director", rogue.keyid)


# ---------------------------------------------------------------- wrong role


async def test_wrong_role_manifest_signed_by_the_director_key(target: Target) -> None:
    manifest = await staged_v3(target, key=director(target))
    await put_assignment(target.js, DEVICE,
                         forge_assignment(director(target), DEVICE, manifest, counter=2))
    await target.expect_refusal("release-manifest", "0 valid signature", "release role")


# ---------------------------------------------------------------- freeze


async def test_freeze_expired_manifest(target: Target) -> None:
    manifest = await staged_v3(target, expires_in_ns=-HOUR_NS)
    await put_assignment(target.js, DEVICE,
                         forge_assignment(director(target), DEVICE, manifest, counter=2))
    await target.expect_refusal("release-manifest expired")


async def test_freeze_expired_assignment(target: Target) -> None:
    manifest = await staged_v3(target)
    await put_assignment(
        target.js, DEVICE,
        # Expired beyond the clock skew devices tolerate (edge_agent.update.EXPIRY_SKEW_NS).
        forge_assignment(director(target), DEVICE, manifest, counter=2,
                         expires_in_ns=-EXPIRY_SKEW_NS - 1),
    )
    await target.expect_refusal("assignment expired")


# ---------------------------------------------------------------- rollback


async def test_rollback_replay_of_an_older_valid_assignment(target: Target) -> None:
    old = bytes(last_assigned(target.fleet, DEVICE).payload["assignment"])
    await target.fleet.release_model(target.model_files["2"], "kws", "2")
    await deploy_and_wait(target.fleet, target.client, "2", [DEVICE])
    target.digest = blake3.blake3(target.model_files["2"].read_bytes()).hexdigest()

    await put_assignment(target.js, DEVICE, old)  # counter 1, properly signed, kws/1
    reason = await target.expect_refusal("counter 1", "not above", "rollback")
    assert "last seen 2" in reason


# ---------------------------------------------------------------- mix and match


async def test_mix_and_match_assignment_for_another_device(target: Target) -> None:
    await target.client.call("device.enroll", {"device": "dev-1"})
    await deploy_and_wait_none(target, "dev-1")
    theirs = bytes(last_assigned(target.fleet, "dev-1").payload["assignment"])
    await put_assignment(target.js, DEVICE, theirs)
    await target.expect_refusal("assignment is for device dev-1, not dev-0")


async def deploy_and_wait_none(t: Target, device: str) -> None:
    """Deploy kws/1 to a device that has no agent: only the signed assignment appears."""
    assigned = len(t.fleet.feed.of_kind(ev.DEVICE_ASSIGNED, device))
    await t.client.call("deploy", {"model": "kws", "version": "1", "devices": [device]})
    await t.fleet.feed.wait_for(
        lambda _: len(t.fleet.feed.of_kind(ev.DEVICE_ASSIGNED, device)) > assigned,
        what=f"the assignment of {device}",
    )


# ---------------------------------------------------------------- blob attacks


async def test_digest_mismatch_between_manifest_and_blob(target: Target) -> None:
    honest = target.model_files["3"].read_bytes()
    digest = blake3.blake3(honest).hexdigest()
    forged = bytearray(honest)
    forged[len(forged) // 2] ^= 0xFF
    obs = await target.js.object_store(RELEASES_BUCKET)
    await obs.put(digest, bytes(forged))  # other bytes under the signed digest's name
    manifest = forge_manifest(release(target), digest, len(honest))
    await put_manifest(target.js, manifest)
    await put_assignment(target.js, DEVICE,
                         forge_assignment(director(target), DEVICE, manifest, counter=2))
    await target.expect_refusal("digest", "does not match")


async def test_endless_data_blob_longer_than_the_manifest_states(target: Target) -> None:
    manifest = await staged_v3(target)
    digest = blake3.blake3(target.model_files["3"].read_bytes()).hexdigest()
    # The attacker appends chunks behind metadata that still states the honest size.
    obs = await target.js.object_store(RELEASES_BUCKET)
    info = await obs.get_info(digest)
    for _ in range(4):
        await target.js.publish(f"$O.{RELEASES_BUCKET}.C.{info.nuid}", os.urandom(128 * 1024))
    meta = info.as_dict()
    meta["chunks"] = (info.chunks or 0) + 4
    name = base64.urlsafe_b64encode(digest.encode()).decode()
    await target.js.publish(f"$O.{RELEASES_BUCKET}.M.{name}", json.dumps(meta).encode(),
                            headers={"Nats-Rollup": "sub"})
    await put_assignment(target.js, DEVICE,
                         forge_assignment(director(target), DEVICE, manifest, counter=2))
    await target.expect_refusal("longer than", "the manifest states")
    assert not (target.state_dir / "slots" / "download.partial").exists()


# ---------------------------------------------------------------- garbage


async def test_malformed_msgpack_in_the_assignment_key(target: Target) -> None:
    await put_assignment(target.js, DEVICE, b"\xc1 not msgpack at all \x93\x01")
    await target.expect_refusal("assignment", "malformed msgpack")
