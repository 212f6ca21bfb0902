"""Model transparency end to end: real nats-server, real hub, a real `ledger witness`
(ledger.witness_runner, in process) cosigning checkpoints, agents as child processes
with `--require-inclusion`. A release reaches such an agent only once its ledger entry
is in a witnessed checkpoint; one that never went through the ledger (an attacker with
the release and director keys writing straight to KV) never does, and a proof bundle
that does not hold is refused and reported. Every wait is on an event or a condition
with a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import blake3
import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from edge_agent import protocol as proto
from edge_agent.protocol.names import (
    RELEASES_BUCKET,
    ROOT_LATEST_KEY,
    ROOTS_BUCKET,
    TRANSPARENCY_BUCKET,
)
from edge_agent.trust.inclusion import verify_release_inclusion
from edge_agent.trust.root import TrustRoot
from hub import events as ev
from hub.client import HubClient
from ledger.checkpoint import open_checkpoint
from ledger.encoding import canonical_decode, canonical_encode
from ledger.errors import NoteError
from ledger.net.remote import LedgerClient
from ledger.net.witness_runner import WitnessRunner
from ledger.note import Verifier, parse_vkey
from ledger.signing import SigningKey
from ledger.storage.bundles import make_bundle_at
from ledger.witness import Witness, WitnessState
from tests.device_kit import (
    ReportWatch,
    applied,
    deploy,
    forge_assignment,
    forge_manifest,
    last_assigned,
    put_assignment,
    put_manifest,
)
from tests.fleet import AgentProcess, Fleet

pytestmark = pytest.mark.timeout(180)

WITNESS = "witness.example/w1"


class StrictAgent(AgentProcess):
    """`edge-agent run --require-inclusion`."""

    def command(self, extra: list[str] | None = None) -> list[str]:
        return super().command([*(extra or []), "--require-inclusion"])


def strict_agent(fleet: Fleet, device: str) -> AgentProcess:
    agent = StrictAgent(device, fleet.nats_url, fleet.root / "devices" / device,
                        fleet.config.trust_root_path, fleet.root / f"{device}.log",
                        bundle=fleet.bundle(device))
    fleet.agents[device] = agent
    return agent


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    """Poll a condition until it holds (a deadline, not a fixed wait)."""
    async def loop() -> None:
        while not await check():
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(loop(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def log_says(agent: AgentProcess, *words: str) -> None:
    async def check() -> bool:
        return any(all(w in line for w in words) for line in agent.log().splitlines())

    await until(check, f"{agent.device_id} to log {words}")


async def add_witness(fleet: Fleet, name: str = WITNESS) -> SigningKey:
    """`hub witness add NAME --pubkey HEX`, through the hub API."""
    key = SigningKey.generate()
    async with await fleet.client() as admin:
        result = await admin.call("witness.add", {"name": name,
                                                   "pubkey": key.public.raw.hex()})
    assert result["threshold"] == 1
    root = fleet.hub.keyring.root
    assert root.version == result["version"] and root.names[key.keyid] == name
    assert result["vkey"] in (fleet.config.home / "witnesses").read_text()
    return key


@contextlib.asynccontextmanager
async def running_witness(fleet: Fleet, key: SigningKey, state: Path,
                          name: str = WITNESS) -> AsyncIterator[None]:
    log = parse_vkey((fleet.config.home / "log.vkey").read_text().strip())
    assert isinstance(log, Verifier)
    witness = Witness(name, key, {log.name: log}, WitnessState(state))
    client = await LedgerClient.connect(fleet.url_as("witness"), name="test witness")
    ready = asyncio.Event()
    task = asyncio.create_task(WitnessRunner(witness, client, lambda _: None).follow(ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await client.close()


async def checkpoint_and_wait_cosigned(fleet: Fleet) -> int:
    """Sign a checkpoint of everything so far; wait until a witness cosigned it."""
    assert fleet.hub.ledger_publishing is not None
    checkpointer = fleet.hub.ledger_publishing.checkpointer
    cp = await checkpointer.sign_now()
    assert cp is not None

    async def cosigned() -> bool:
        got = checkpointer.checkpoints.get(cp.size)
        return got is not None and bool(got.cosignatures)

    await until(cosigned, f"checkpoint {cp.size} to be cosigned")
    return cp.size


async def bundle_of(js: JetStreamContext, key: str) -> bytes | None:
    kv = await js.key_value(TRANSPARENCY_BUCKET)
    try:
        return (await kv.get(key)).value
    except KeyNotFoundError:
        return None


async def wait_bundle(js: JetStreamContext, key: str) -> bytes:
    async def there() -> bool:
        return await bundle_of(js, key) is not None

    await until(there, f"transparency bundle {key}")
    data = await bundle_of(js, key)
    assert data is not None
    return data


async def test_a_release_is_installed_only_after_witnesses_cosign(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    key = await add_witness(fleet)
    await fleet.release_model(model_files["1"], "kws", "1")
    async with await fleet.client() as admin, await fleet.client(role="hub") as hub_side:
        await admin.call("device.enroll", {"device": "dev-s"})
        agent = strict_agent(fleet, "dev-s").start()
        await deploy(admin, "1", ["dev-s"])
        await log_says(agent, "waiting for witnesses", "kws/1")
        assert not applied(fleet, "dev-s", "1")
        assert await bundle_of(hub_side.nc.jetstream(), "kws.1") is None

        async with running_witness(fleet, key, tmp_path / "w.json"):
            await checkpoint_and_wait_cosigned(fleet)
            data = await wait_bundle(hub_side.nc.jetstream(), "kws.1")
            await fleet.feed.wait_for(lambda _: applied(fleet, "dev-s", "1"),
                                      what="dev-s to apply kws/1 once witnessed")
        # What the agent checked, checked here with the hub's trust root alone.
        root = TrustRoot.load(fleet.config.trust_root_path)
        assignment = proto.Assignment.from_map(proto.SignedEnvelope.decode(
            last_assigned(fleet, "dev-s").payload["assignment"]).document("assignment"))
        report = verify_release_inclusion(root, data, assignment)
        assert report.entry.kind == ev.MODEL_RELEASED and report.witnesses == [WITNESS]
        assert "transparency: kws/1 is entry" in agent.log()


async def test_a_release_outside_the_ledger_is_never_installed_with_stolen_keys(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    key = await add_witness(fleet)
    await fleet.release_model(model_files["1"], "kws", "1")
    async with running_witness(fleet, key, tmp_path / "w.json"), \
            await fleet.client() as admin, await fleet.client(role="hub") as attacker:
        await checkpoint_and_wait_cosigned(fleet)
        for device in ("dev-strict", "dev-plain"):
            await admin.call("device.enroll", {"device": device})
        strict = strict_agent(fleet, "dev-strict").start()
        fleet.agent("dev-plain").start()
        await deploy(admin, "1", ["dev-strict", "dev-plain"])
        await fleet.feed.wait_for(
            lambda _: applied(fleet, "dev-strict", "1") and applied(fleet, "dev-plain", "1"),
            what="both devices to apply the witnessed kws/1")

        # The attacker holds the release and director keys and can write to NATS: a
        # validly signed kws/3 that was never released through the hub, so never logged.
        js = attacker.nc.jetstream()
        digest, size = await upload(attacker, model_files["3"])
        manifest = forge_manifest(fleet.config.load_key("release"), digest, size, version="3")
        await put_manifest(js, manifest)
        plain_reports = await ReportWatch.start(fleet.url_as(), "dev-plain")
        try:
            for device in ("dev-strict", "dev-plain"):
                counter = int(last_assigned(fleet, device).payload["counter"]) + 1
                await put_assignment(js, device, forge_assignment(
                    fleet.config.load_key("director"), device, manifest, counter))
            # Without --require-inclusion the stolen keys are enough: it installs kws/3.
            report = await plain_reports.status("applied", timeout=60)
            assert isinstance(report, proto.StatusReport) and report.version == "3"
        finally:
            await plain_reports.close()
        # With it, the agent waits for a proof that cannot exist, through new witnessed
        # checkpoints, and keeps running kws/1.
        await log_says(strict, "waiting for witnesses", "kws/3")
        await checkpoint_and_wait_cosigned(fleet)
        assert await bundle_of(js, "kws.3") is None
        assert strict.process is not None and strict.process.poll() is None
        assert not any(e.payload["version"] == "3"
                       for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, "dev-strict"))
        assert '"version": "3"' not in (strict.state_dir / "active.json").read_text()


async def upload(client: HubClient, path: Path) -> tuple[str, int]:
    """Put a blob straight into the bucket devices read (`client` has the hub's NATS
    rights: the attacker's, in these tests)."""
    data = path.read_bytes()
    store = await client.nc.jetstream().object_store(RELEASES_BUCKET)
    await store.put(blake3.blake3(data).hexdigest(), data)
    return blake3.blake3(data).hexdigest(), len(data)


def _tampered_proof(data: bytes) -> bytes:
    doc = canonical_decode(data)
    assert isinstance(doc, dict)
    proof = list(doc["inclusion_proof"])
    proof[0] = bytes([proof[0][0] ^ 1]) + proof[0][1:]
    return canonical_encode({**doc, "inclusion_proof": proof})


async def test_a_bad_proof_bundle_is_refused_and_reported(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    key = await add_witness(fleet)
    for version in ("1", "2", "3"):
        await fleet.release_model(model_files[version], "kws", version)
    async with running_witness(fleet, key, tmp_path / "w.json"), \
            await fleet.client() as admin, await fleet.client(role="hub") as attacker:
        size = await checkpoint_and_wait_cosigned(fleet)
        js = attacker.nc.jetstream()
        kv = await js.key_value(TRANSPARENCY_BUCKET)
        # A tampered inclusion proof for kws/2.
        await kv.put("kws.2", _tampered_proof(await wait_bundle(js, "kws.2")))
        # A bundle for kws/3 whose checkpoint carries too few (no) cosignatures.
        entry = next(e for e in fleet.feed.of_kind(ev.MODEL_RELEASED)
                     if e.payload["version"] == "3")
        await wait_bundle(js, "kws.3")
        stored = fleet.hub.ledger_publishing.checkpointer.checkpoints.get(size)  # type: ignore[union-attr]
        assert stored is not None
        bare = dataclasses.replace(stored, cosignatures=())
        await kv.put("kws.3", make_bundle_at(fleet.hub.store, entry.seq, bare))

        await admin.call("device.enroll", {"device": "dev-s"})
        strict_agent(fleet, "dev-s").start()
        await deploy(admin, "1", ["dev-s"])
        await fleet.feed.wait_for(lambda _: applied(fleet, "dev-s", "1"),
                                  what="dev-s to apply kws/1")
        for version, words in (("2", "inclusion proof"), ("3", "cosigned by 0")):
            before = len(fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, "dev-s"))

            def refused(_: object, n: int = before) -> bool:
                return len(fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, "dev-s")) > n

            await deploy(admin, version, ["dev-s"])
            await fleet.feed.wait_for(refused, what=f"dev-s to refuse kws/{version}")
            reason = str(fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, "dev-s")[-1]
                         .payload["reason"])
            assert "transparency proof refused" in reason and words in reason, reason
            assert not applied(fleet, "dev-s", version)
        assert blake3.blake3(model_files["1"].read_bytes()).hexdigest() in (
            fleet.agents["dev-s"].state_dir / "active.json").read_text()


async def test_cli_witness_add_as_a_new_user_would(fleet: Fleet, tmp_path: Path) -> None:
    from tests.test_key_rotation import hub_cli
    from tests.test_ledger_witness_nats import run_cli

    code, vkey, err = await run_cli("witness-key", "--out", str(tmp_path / "w.key"),
                                    "--name", WITNESS)
    assert code == 0, err
    code, text = await hub_cli(fleet, "witness", "add", WITNESS, "--pubkey", vkey.strip())
    assert code == 0 and "trust root version 2" in text and "1 cosignature" in text, text
    code, text = await hub_cli(fleet, "keys", "show")
    assert code == 0 and "witness" in text and WITNESS in text, text
    assert fleet.config.origin in text  # the log key is now named by the origin
    assert vkey.strip() in (fleet.config.home / "witnesses").read_text()
    # The same witness again, a malformed key, or a threshold it cannot meet: refused.
    for args, words in (([WITNESS, "--pubkey", vkey.strip()], "already"),
                        (["w2", "--pubkey", "zz"], "64 hex digits"),
                        (["w2", "--pubkey", "ab" * 32, "--threshold", "3"], "threshold 3")):
        code, text = await hub_cli(fleet, "witness", "add", *args)
        assert code != 0 and words in text, text
    assert fleet.hub.keyring.root.version == 2


async def test_cli_witness_remove_and_list_as_a_new_user_would(fleet: Fleet) -> None:
    from tests.test_key_rotation import hub_cli

    first = await add_witness(fleet)
    second = SigningKey.generate()
    code, text = await hub_cli(fleet, "witness", "add", "w2", "--pubkey",
                               second.public.raw.hex(), "--threshold", "2")
    assert code == 0 and "2 cosignature" in text, text
    code, text = await hub_cli(fleet, "witness", "list", "--json")
    listed = json.loads(text)
    assert code == 0 and listed["threshold"] == 2, text
    assert {(w["name"], w["keyid"]) for w in listed["witnesses"]} == {
        (WITNESS, first.keyid), ("w2", second.keyid)}
    witness_file = fleet.config.home / "witnesses"
    version = fleet.hub.keyring.root.version
    # Refusals change nothing: an unknown name, a threshold the rest cannot meet,
    # and `keys revoke` on a witness key (it would not update HOME/witnesses).
    for args, words in ((["witness", "remove", "nobody"], "no witness named 'nobody'"),
                        (["witness", "remove", "w2"], "--threshold 1..1"),
                        (["keys", "revoke", second.keyid], "hub witness remove w2")):
        code, text = await hub_cli(fleet, *args)
        assert code != 0 and words in text, text
    assert fleet.hub.keyring.root.version == version
    assert "w2+" in witness_file.read_text()

    code, text = await hub_cli(fleet, "witness", "remove", "w2", "--threshold", "1")
    assert code == 0 and f"version {version + 1}" in text and "1 cosignature" in text, text
    root = fleet.hub.keyring.root
    assert root.version == version + 1 and root.roles["witness"].keyids == (first.keyid,)
    assert second.keyid not in root.keys and second.keyid not in root.names
    assert "w2+" not in witness_file.read_text() and WITNESS in witness_file.read_text()
    revoked = [e for e in fleet.hub.store.iter_entries() if e.kind == ev.KEYS_REVOKED]
    assert [(e.payload["role"], e.payload["name"]) for e in revoked] == [("witness", "w2")]
    # What devices fetch (KV bucket `roots`, latest) is the new root, without w2.
    nc = await fleet.connect()
    try:
        latest = await (await nc.jetstream().key_value(ROOTS_BUCKET)).get(ROOT_LATEST_KEY)
    finally:
        await nc.close()
    assert latest.value is not None
    published = TrustRoot.from_envelope(proto.SignedEnvelope.decode(latest.value))
    assert published.version == version + 1 and second.keyid not in published.keys

    # The last witness stays until its replacement is in.
    code, text = await hub_cli(fleet, "witness", "remove", WITNESS)
    assert code != 0 and "only witness" in text and "hub witness add" in text, text
    assert fleet.hub.keyring.root.version == version + 1


async def test_log_key_rotation_keeps_witnesses_and_devices_working(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    """`hub keys rotate log`: checkpoints carry the old and the new log signature, so a
    witness configured with the old vkey keeps cosigning and a device installs; after
    `hub keys revoke OLD` only the new key signs and HOME/log.vkey names it."""
    key = await add_witness(fleet)
    keyring = fleet.hub.keyring
    (old_keyid,) = keyring.root.roles["log"].keyids
    vkey_path = fleet.config.home / "log.vkey"
    old_log = parse_vkey(vkey_path.read_text().strip())
    assert isinstance(old_log, Verifier)
    state = tmp_path / "w.json"
    async with running_witness(fleet, key, state):  # knows only the old log key
        await checkpoint_and_wait_cosigned(fleet)
        async with await fleet.client() as admin:
            rotated = await admin.call("keys.rotate", {"role": "log"})
        new_log = parse_vkey(vkey_path.read_text().strip())
        assert isinstance(new_log, Verifier)
        assert new_log.name == old_log.name == fleet.config.origin
        assert new_log.key_hash != old_log.key_hash
        assert keyring.root.roles["log"].keyids == (old_keyid, rotated["keyid"])

        await fleet.release_model(model_files["1"], "kws", "1")
        async with await fleet.client() as admin:
            await admin.call("device.enroll", {"device": "dev-s"})
            strict_agent(fleet, "dev-s").start()
            await deploy(admin, "1", ["dev-s"])
        size = await checkpoint_and_wait_cosigned(fleet)
        await fleet.feed.wait_for(lambda _: applied(fleet, "dev-s", "1"),
                                  what="dev-s to apply kws/1 witnessed under both log keys")
    checkpointer = fleet.hub.ledger_publishing.checkpointer  # type: ignore[union-attr]
    both = checkpointer.checkpoints.get(size)
    assert both is not None
    for verifier in (old_log, new_log):
        assert open_checkpoint(both.note, verifier).checkpoint.size == size

    async with await fleet.client() as admin:
        revoked = await admin.call("keys.revoke", {"keyid": old_keyid})
    assert revoked["role"] == "log" and keyring.root.roles["log"].keyids == (rotated["keyid"],)
    assert not (fleet.config.home / "keys" / "log.key").exists()
    assert parse_vkey(vkey_path.read_text().strip()) == new_log
    async with await fleet.client() as admin:
        await admin.call("device.enroll", {"device": "dev-t"})  # the tree grows
    # A witness moved to the new vkey (same state file: same log, consistent tree).
    async with running_witness(fleet, key, state):
        after = await checkpoint_and_wait_cosigned(fleet)
    note = checkpointer.checkpoints.get(after)
    assert note is not None and after > size
    assert open_checkpoint(note.note, new_log).checkpoint.size == after
    with pytest.raises(NoteError):
        open_checkpoint(note.note, old_log)
