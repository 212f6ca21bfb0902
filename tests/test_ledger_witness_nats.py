"""Checkpoints on the wire: the hub signs, stores and publishes them (hub/log/checkpointer.py),
serves proofs on `ledger.api.*` (hub/log/api.py), a `ledger witness` process cosigns
them and refuses a fork, and `ledger tail --follow` follows the feed. Real nats-server,
real SQLite, the `ledger` command as a subprocess; every wait is on an event."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from edge_agent.transport.connect import connect as nats_connect
from hub.client import HubClient
from hub.home.config import HomeError, init_home, load_config
from hub.log.api import LedgerApi
from hub.log.checkpointer import Checkpointer, log_signer
from hub.service.app import HubService
from ledger.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from ledger.merkle import verify_consistency, verify_inclusion
from ledger.net.remote import CHECKPOINT_SUBJECT, LedgerClient, RemoteError
from ledger.note import CosignatureVerifier, Verifier, parse_vkey
from ledger.signing import SigningKey
from ledger.storage.checkpoint_store import CheckpointStore
from ledger.storage.store import LedgerStore
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet, url_as

pytestmark = pytest.mark.timeout(120)
WITNESS = "witness.example/w1"


def log_verifier(fleet: Fleet) -> Verifier:
    key = parse_vkey((fleet.config.home / "log.vkey").read_text().strip())
    assert isinstance(key, Verifier)
    return key


class Checkpoints:
    """What the hub publishes on `ledger.checkpoint`."""

    def __init__(self) -> None:
        self.notes: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(self, msg: Msg) -> None:
        self.notes.put_nowait(msg.data)

    async def wait_for_size(self, log: Verifier, size: int) -> bytes:
        while True:
            note = await asyncio.wait_for(self.notes.get(), 30)
            if open_checkpoint(note, log).checkpoint.size >= size:
                return note


async def enroll(fleet: Fleet, *devices: str) -> None:
    async with await fleet.client() as admin:
        for device in devices:
            await admin.call("device.enroll", {"device": device})


async def test_hub_signs_publishes_and_serves_proofs(fleet: Fleet) -> None:
    log = log_verifier(fleet)
    seen = Checkpoints()
    nc = await fleet.connect()
    await nc.subscribe("ledger.checkpoint", cb=seen.on_msg)
    await nc.flush()
    store = fleet.hub.store
    assert fleet.hub.ledger_publishing is not None
    checkpointer = fleet.hub.ledger_publishing.checkpointer
    client = await LedgerClient.connect(fleet.url_as("witness"))
    try:
        await enroll(fleet, "dev-1", "dev-2", "dev-3")
        first = await checkpointer.sign_now()
        assert first is not None and first.size == store.count()
        note = await seen.wait_for_size(log, first.size)
        assert open_checkpoint(note, log).checkpoint.root == store.root(first.size)
        again = await checkpointer.sign_now()  # the tree did not grow: nothing new
        assert again is not None and again.size == first.size
        remote = await client.checkpoint()
        assert remote.size == first.size and remote.note == first.note

        await enroll(fleet, "dev-4", "dev-5")
        second = await checkpointer.sign_now()
        assert second is not None and second.size == first.size + 2
        th = remote.tree_hash
        proof = await client.consistency(first.size, second.size)
        verify_consistency(th, first.size, second.size, first.root, second.root, proof)
        inclusion = await client.inclusion(1, second.size)
        entry = store.get(1)
        assert entry is not None
        verify_inclusion(th, 1, second.size, th.leaf(entry.body), inclusion, second.root)
        entries = await client.entries(0)
        assert [e.seq for e in entries] == list(range(store.count()))
        assert all(e.hash_matches() for e in entries)
        assert [e.seq for e in await client.entries(3, limit=2)] == [3, 4]
        with pytest.raises(RemoteError, match="exceeds the second"):
            await client.consistency(second.size, first.size)
        with pytest.raises(RemoteError, match="unknown verb 'nope'"):
            await client.call("nope", {})
        with pytest.raises(RemoteError, match="no witnesses"):
            await client.submit_cosignature(second.note)
    finally:
        await client.close()
        await nc.close()


@pytest.fixture
async def fast_hub(tmp_path: Path, nats_server: EmbeddedNats) -> AsyncIterator[HubService]:
    config = load_config(tmp_path / "hub")
    config = dataclasses.replace(config, checkpoint_every_entries=2,
                                 checkpoint_every_seconds=3600)
    hub = HubService(config)
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


async def test_the_hub_signs_every_n_entries(fast_hub: HubService) -> None:
    config = fast_hub.config
    key = parse_vkey((config.home / "log.vkey").read_text().strip())
    assert isinstance(key, Verifier)
    seen = Checkpoints()
    nc = await nats_connect(url_as(config, "witness"))
    await nc.subscribe("ledger.checkpoint", cb=seen.on_msg)
    await nc.flush()
    try:
        admin_key = SigningKey.load(config.operator_key_path("admin"))
        async with await HubClient.connect(config.nats_url, admin_key,
                                           auth=config.operator_auth(admin_key)) as admin:
            for device in ("dev-a", "dev-b", "dev-c"):
                await admin.call("device.enroll", {"device": device})
        size = fast_hub.store.count()
        assert size >= 4  # the first admin + three devices
        # Every second entry is due; the last one (size - 1 + 1) may be an odd one out.
        note = await seen.wait_for_size(key, size - (size % 2))
        assert open_checkpoint(note, key).checkpoint.size in (size - 1, size)
    finally:
        await nc.close()


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def read_until(stream: asyncio.StreamReader, needle: str, timeout: float = 30) -> str:
    async def loop() -> str:
        seen: list[str] = []
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"stream ended before {needle!r}; got {seen}")
            seen.append(line)
            if needle in line:
                return line
    return await asyncio.wait_for(loop(), timeout)


async def make_witness_key(fleet: Fleet, tmp_path: Path) -> tuple[Path, str]:
    key = tmp_path / "witness.key"
    code, out, err = await run_cli("witness-key", "--out", str(key), "--name", WITNESS)
    assert code == 0, err
    vkey = out.strip()
    (fleet.config.home / "witnesses").write_text(f"# witnesses of this hub\n{vkey}\n")
    return key, vkey


async def test_a_witness_cosigns_a_chain_of_growing_checkpoints(
    fleet: Fleet, tmp_path: Path
) -> None:
    key, vkey = await make_witness_key(fleet, tmp_path)
    witness_key = parse_vkey(vkey)
    assert isinstance(witness_key, CosignatureVerifier)
    assert fleet.hub.ledger_publishing is not None
    checkpointer = fleet.hub.ledger_publishing.checkpointer
    await checkpointer.sign_now()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli", "witness", "--nats", fleet.url_as("witness"),
        "--log-vkey", str(fleet.config.home / "log.vkey"), "--key", str(key),
        "--name", WITNESS, "--state", str(tmp_path / "witness-state.json"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        await read_until(proc.stdout, "cosigned")  # caught up, and subscribed
        sizes = []
        for i in range(3):
            await enroll(fleet, f"dev-{i}")
            cp = await checkpointer.sign_now()
            assert cp is not None
            sizes.append(cp.size)
            line = await read_until(proc.stdout, f"tree size {cp.size};")
            assert WITNESS in line  # the hub stored it
        # An old checkpoint published again (a replay, a redelivery) is a prefix of what
        # the witness cosigned: ignored quietly, no false "rollback" alarm and no exit.
        replayed = checkpointer.checkpoints.get(sizes[0])
        assert replayed is not None and checkpointer._js is not None
        await checkpointer._js.publish(CHECKPOINT_SUBJECT, replayed.note,
                                       headers={"Nats-Msg-Id": "replay"})
        await enroll(fleet, "dev-after-replay")
        cp = await checkpointer.sign_now()
        assert cp is not None
        await read_until(proc.stdout, f"tree size {cp.size};")
        assert proc.returncode is None
        for size in sizes:
            stored = checkpointer.checkpoints.get(size)
            assert stored is not None
            opened = open_checkpoint(stored.full_note(), log_verifier(fleet), [witness_key])
            assert [c.name for c in opened.cosignatures] == [WITNESS]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
    # An auditor's proof bundle from the hub's database carries the cosignature.
    bundle = tmp_path / "seq0.bundle"
    db = fleet.config.database_url()
    code, out, err = await run_cli("prove", "--db", db, "--seq", "0", "--out", str(bundle))
    assert code == 0, err
    code, out, err = await run_cli("verify-bundle", str(bundle), "--log-key",
                                   str(fleet.config.home / "log.vkey"), "--witness-key", vkey)
    assert code == 0, out + err
    assert WITNESS in out


async def test_a_witness_refuses_a_fork_and_prints_both_notes(
    fleet: Fleet, tmp_path: Path
) -> None:
    key, _ = await make_witness_key(fleet, tmp_path)
    state = tmp_path / "witness-state.json"
    args = ["--log-vkey", str(fleet.config.home / "log.vkey"), "--key", str(key),
            "--name", WITNESS, "--state", str(state), "--once"]
    await enroll(fleet, "dev-1", "dev-2")
    assert fleet.hub.ledger_publishing is not None
    honest = await fleet.hub.ledger_publishing.checkpointer.sign_now()
    assert honest is not None
    code, out, err = await run_cli("witness", "--nats", fleet.url_as("witness"), *args)
    assert code == 0, out + err
    assert f"tree size {honest.size};" in out

    # A second ledger that keeps the first entries and then diverges, signed with the
    # same log key and served to the witness from another server (a split view).
    signer = log_signer(fleet.config)
    evil_nats = EmbeddedNats(store_dir=tmp_path / "evil-nats").start()
    fork = LedgerStore.open(tmp_path / "fork.db")
    nc = await nats.connect(evil_nats.url)
    try:
        for entry in fleet.hub.store.iter_entries():
            if entry.seq == honest.size - 1:
                break
            fork.append(entry.kind, entry.actor, entry.subject, entry.payload, ts=entry.ts)
        for i in range(4):
            fork.append("device.enrolled", "mallory", f"device:ghost-{i}", {"device": "x"})
        size = fork.count()
        root = fork.root(size)
        CheckpointStore(fork).add(size, root, sign_checkpoint(
            Checkpoint(signer.name, size, root), signer))
        api = LedgerApi(fork, Checkpointer(fork, lambda: [signer]))
        await api.start(nc)
        await nc.flush()
        code, out, err = await run_cli("witness", "--nats", evil_nats.url, *args)
    finally:
        await nc.close()
        fork.close()
        evil_nats.close()
    assert code == 1, out + err
    assert f"FORK of {signer.name}" in out
    assert honest.note.decode().split("\n\n")[0] in out  # the checkpoint it cosigned
    assert f"{signer.name}\n{size}\n" in out  # and the forked one
    assert json.loads(state.read_text())["checkpoints"][signer.name].split("\n")[1] == str(
        honest.size)  # it still remembers the honest one


async def test_tail_follows_the_feed_and_the_database(fleet: Fleet) -> None:
    db = fleet.config.database_url()
    feed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli", "tail", "--follow", "--nats", fleet.url_as("witness"),
        "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    poll = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli", "tail", "--follow", "--db", db, "-n", "1",
        "--interval", "0.1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert feed.stdout and feed.stderr and poll.stdout and poll.stderr
    try:
        await read_until(feed.stderr, "following ledger.entry")
        await read_until(poll.stderr, "following")
        await enroll(fleet, "dev-tail")
        line = await read_until(feed.stdout, "dev-tail")
        doc = json.loads(line)
        assert doc["kind"] == "device.enrolled" and doc["subject"] == "device:dev-tail"
        polled = await read_until(poll.stdout, "device:dev-tail")
        assert "device.enrolled" in polled
    finally:
        for proc in (feed, poll):
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


def test_hub_init_writes_the_log_verifier_key(tmp_path: Path) -> None:
    config = init_home(tmp_path / "my hub+1", "nats://127.0.0.1:1")
    assert re.fullmatch(r"fleetledger\.local/[0-9a-f]{16}", config.origin)  # URL-like, unique
    assert config.tree_hash == "sha256"  # RFC 6962 by default
    other = init_home(tmp_path / "my hub+1", "nats://127.0.0.1:1", force=True)
    assert other.origin != config.origin  # not derived from the directory's name
    named = init_home(tmp_path / "b3", "nats://127.0.0.1:1", origin="example.com/fleet",
                      tree_hash="blake3")
    assert (named.origin, named.tree_hash) == ("example.com/fleet", "blake3")
    with LedgerStore.open(named.database_url(), tree_hash=named.tree_hash) as store:
        assert store.tree_hash.name == "blake3"
    for bad in ("has space", "a+b", ""):
        with pytest.raises(HomeError):
            init_home(tmp_path / "bad", "nats://127.0.0.1:1", origin=bad)
    config = named
    key = parse_vkey((config.home / "log.vkey").read_text().strip())
    assert isinstance(key, Verifier) and key.name == config.origin
    assert key == log_signer(config).verifier()
    done = subprocess.run([sys.executable, "-m", "ledger.cli", "witness", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "--once" in done.stdout


async def test_witness_signs_in_with_user_and_password_file(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Credentials off the command line: --nats-user + --nats-password-file on a plain URL;
    without them the server refuses and the witness says so in one line (exit 2)."""
    key, _ = await make_witness_key(fleet, tmp_path)
    await enroll(fleet, "dev-1")
    assert fleet.hub.ledger_publishing is not None
    cp = await fleet.hub.ledger_publishing.checkpointer.sign_now()
    assert cp is not None
    auth = fleet.config.nats_auth("witness")
    assert auth.user == "witness" and auth.password
    secret = tmp_path / "nats-password"
    secret.write_text(auth.password + "\n")
    args = ["witness", "--nats", fleet.nats_url, "--log-vkey",
            str(fleet.config.home / "log.vkey"), "--key", str(key), "--name", WITNESS,
            "--state", str(tmp_path / "state.json"), "--once", "--timeout", "5"]
    code, out, err = await run_cli(*args)
    assert code == 2 and "cannot reach NATS" in err and "Traceback" not in err, err
    assert auth.password not in out + err
    code, out, err = await run_cli(*args, "--nats-user", "witness",
                                   "--nats-password-file", str(secret))
    assert code == 0, out + err
    assert f"tree size {cp.size}" in out
    stored = fleet.hub.ledger_publishing.checkpointer.checkpoints.get(cp.size)
    assert stored is not None and [c.name for c in stored.cosignatures] == [WITNESS]
    code, out, err = await run_cli(*args, "--nats-user", "witness",
                                   "--nats-password-file", str(tmp_path / "missing"))
    assert code == 2 and "cannot read a password" in err, err


async def test_the_checkpointer_signs_the_tree_hash(tmp_path: Path) -> None:
    signer = log_signer(init_home(tmp_path / "home", "nats://127.0.0.1:1", nats_auth=False))
    for tree_hash, line in (("sha256", None), ("blake3", "fleetledger-merkle-hash blake3")):
        with LedgerStore.open(tmp_path / f"{tree_hash}.db", tree_hash=tree_hash) as store:
            store.append("device.status", "a", "device:a", {"i": 1})
            cp = await Checkpointer(store, lambda: [signer]).sign_now()
            assert cp is not None
            opened = open_checkpoint(cp.note, signer.verifier()).checkpoint
            assert opened.extensions == (() if line is None else (line,))
