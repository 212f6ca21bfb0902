"""The key-rotation story (issue 15, "Rotation that everyone survives"): the log key and
the director key are rotated and then revoked in the middle of a deployment, with a
witness that was started with the old log key and a device that runs with
`--require-inclusion`. Afterwards the auditor's `ledger verify` with the current key
material passes, the witness still cosigns (it followed the rotation through the trust
roots recorded in the log, and said so), and the device rolls back to a release made
before the revocation. Real nats-server, real hub, the agent as a child process."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent import protocol as proto
from edge_agent.trust.inclusion import verify_release_inclusion
from edge_agent.trust.root import TrustRoot
from hub import events as ev
from ledger.net.remote import LedgerClient
from ledger.net.witness_runner import WitnessRunner
from ledger.note import Verifier, parse_vkey
from ledger.signing import SigningKey
from ledger.witness import Witness, WitnessState
from tests.device_kit import applied, deploy, last_assigned
from tests.fleet import Fleet
from tests.test_key_rotation import hub_cli
from tests.test_ledger_witness_nats import run_cli
from tests.test_transparency import (
    WITNESS,
    add_witness,
    bundle_of,
    checkpoint_and_wait_cosigned,
    strict_agent,
)

pytestmark = pytest.mark.timeout(240)

DEVICE = "dev-s"


@contextlib.asynccontextmanager
async def witness_said(fleet: Fleet, key: SigningKey, state: Path,
                       said: list[str]) -> AsyncIterator[asyncio.Task[None]]:
    """A `ledger witness` (in process) pinned to the log key HOME/log.vkey names now;
    what it says goes to `said`."""
    log = parse_vkey((fleet.config.home / "log.vkey").read_text().strip())
    assert isinstance(log, Verifier)
    witness = Witness(WITNESS, key, {log.name: log}, WitnessState(state))
    client = await LedgerClient.connect(fleet.url_as("witness"), name="story witness")
    ready = asyncio.Event()
    task = asyncio.create_task(WitnessRunner(witness, client, said.append).follow(ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await client.close()


def applied_count(fleet: Fleet, version: str) -> int:
    return sum(1 for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)
               if e.payload["version"] == version)


async def deploy_witnessed(fleet: Fleet, version: str) -> None:
    """Deploy kws/VERSION to the device and wait until it applied it (which needs a
    witnessed checkpoint covering the release and a proof bundle against it)."""
    before = applied_count(fleet, version)
    async with await fleet.client() as admin:
        await deploy(admin, version, [DEVICE])
    await checkpoint_and_wait_cosigned(fleet)
    await fleet.feed.wait_for(lambda _: applied_count(fleet, version) > before,
                              timeout=90, what=f"{DEVICE} to apply kws/{version}")


async def test_rotation_that_everyone_survives(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    home = fleet.config.home
    witness_key = await add_witness(fleet)
    await fleet.release_model(model_files["1"], "kws", "1")
    await fleet.release_model(model_files["2"], "kws", "2")
    keyring = fleet.hub.keyring
    (old_log,) = keyring.root.roles["log"].keyids
    (old_director,) = keyring.root.roles["director"].keyids
    said: list[str] = []
    async with witness_said(fleet, witness_key, tmp_path / "w.json", said) as witness:
        async with await fleet.client() as admin:
            await admin.call("device.enroll", {"device": DEVICE})
        strict_agent(fleet, DEVICE).start()
        await deploy_witnessed(fleet, "1")

        # Mid-deployment: new log and director keys, then the old ones revoked.
        async with await fleet.client() as admin:
            new_log = (await admin.call("keys.rotate", {"role": "log"}))["keyid"]
            await admin.call("keys.rotate", {"role": "director"})
        await deploy_witnessed(fleet, "2")
        async with await fleet.client() as admin:
            await admin.call("keys.revoke", {"keyid": old_log})
            await admin.call("keys.revoke", {"keyid": old_director})
        assert keyring.root.roles["log"].keyids == (new_log,)
        assert not applied(fleet, DEVICE, "3")

        # The witness, pinned to the old log key, keeps cosigning: it learned the new
        # key from the trust roots recorded in the log, and says so.
        async with await fleet.client() as admin:
            await admin.call("device.enroll", {"device": "dev-t"})  # the tree grows
        await checkpoint_and_wait_cosigned(fleet)
        assert not witness.done(), witness
        assert any("log key rotated" in line for line in said), said

        # Rollback to a release made (and witnessed) before the revocation: its proof
        # bundle was re-published against a checkpoint the live log key signed.
        await deploy_witnessed(fleet, "1")
        async with await fleet.client(role="hub") as hub_side:
            data = await bundle_of(hub_side.nc.jetstream(), "kws.1")
        assert data is not None
        root = TrustRoot.load(fleet.config.trust_root_path)
        assignment = proto.Assignment.from_map(proto.SignedEnvelope.decode(
            last_assigned(fleet, DEVICE).payload["assignment"]).document("assignment"))
        assert assignment.version == "1"
        assert verify_release_inclusion(root, data, assignment).entry.payload["version"] == "1"

    # The auditor, with the current material only (HOME/log.vkey): every checkpoint
    # ever signed checks, the old ones under the log keys the recorded roots name.
    code, out, err = await run_cli("verify", "--home", str(home), "--log-key",
                                   str(home / "log.vkey"), "--json")
    report = json.loads(out) if out.strip().startswith("{") else {}
    assert code == 0 and report.get("ok"), out + err
    assert {old_log, new_log} <= set(report["log_keys"]["keyids"])
    # An auditor who kept the old vkey (HOME/log-keys keeps it) gets the same answer,
    # and several keys may be given.
    old_vkey = home / "log-keys" / f"{old_log}.vkey"
    code, out, err = await run_cli("verify", "--home", str(home), "--log-key", str(old_vkey))
    assert code == 0 and "OK: log keys followed" in out, out + err
    code, out, err = await run_cli("verify", "--home", str(home), "--log-key", str(old_vkey),
                                   "--log-key", str(home / "log.vkey"),
                                   "--witness-key", (home / "witnesses").read_text().split()[0])
    assert code == 0 and "OK: witnessed" in out, out + err
    # `hub keys show` lists both log keys, the revoked one marked.
    code, text = await hub_cli(fleet, "keys", "show", "--json")
    assert code == 0, text
    kept = {k["keyid"]: k["revoked"] for k in json.loads(text)["log_keys"]}
    assert kept == {old_log: True, new_log: False}, kept


async def test_a_witness_that_cannot_follow_says_why_and_stops(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A witness that never cosigned anything under the old key has nothing to learn a
    rotation from: it exits with the reason instead of falling silent."""
    witness_key = await add_witness(fleet)
    old_vkey = (fleet.config.home / "log.vkey").read_text().strip()
    (old_log,) = fleet.hub.keyring.root.roles["log"].keyids
    async with await fleet.client() as admin:
        await admin.call("keys.rotate", {"role": "log"})
        await admin.call("keys.revoke", {"keyid": old_log})
        await admin.call("device.enroll", {"device": "dev-t"})
    assert fleet.hub.ledger_publishing is not None
    await fleet.hub.ledger_publishing.checkpointer.sign_now()
    log = parse_vkey(old_vkey)
    assert isinstance(log, Verifier)
    witness = Witness(WITNESS, witness_key, {log.name: log}, WitnessState(tmp_path / "w.json"))
    async with await LedgerClient.connect(fleet.url_as("witness")) as client:
        with pytest.raises(Exception, match="signed by no log key this witness trusts"):
            await WitnessRunner(witness, client, lambda _: None).once()


async def test_verify_after_a_rotation_no_checkpoint_saw(fleet: Fleet) -> None:
    """Rotate and revoke the log key with no checkpoint in between: the checkpoints
    before are the old key's alone, those after the new key's alone."""
    home = fleet.config.home
    await add_witness(fleet)
    assert fleet.hub.ledger_publishing is not None
    checkpointer = fleet.hub.ledger_publishing.checkpointer
    await checkpointer.sign_now()
    (old_log,) = fleet.hub.keyring.root.roles["log"].keyids
    async with await fleet.client() as admin:
        await admin.call("keys.rotate", {"role": "log"})
        await admin.call("keys.revoke", {"keyid": old_log})
        await admin.call("device.enroll", {"device": "dev-t"})
    await checkpointer.sign_now()
    for vkey in (home / "log.vkey", home / "log-keys" / f"{old_log}.vkey"):
        code, out, err = await run_cli("verify", "--home", str(home), "--log-key", str(vkey))
        assert code == 0 and "OK: agrees with 2 signed checkpoint(s)" in out, out + err
