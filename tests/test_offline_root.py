"""The offline root key (issue 15): a hub made with `hub init --offline-root` runs without
the root key; trust root N+1 is prepared on the hub (`hub keys root prepare`), signed on
"another machine" (`hub keys root sign` in a process with an empty HOME, no hub home, no
NATS URL and, where `unshare --net` works, no network at all) and imported
(`hub keys root import`). A real agent walks to the imported root and installs a release
made after it; `ledger verify` passes. Every refusal (tampered, wrong key, version skip,
replay, below threshold) leaves the trust root, the KV bucket `roots` and the ledger as
they were. Real nats-server, the hub in process, every step through the CLIs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent import protocol as proto
from edge_agent.protocol.documents import DOMAIN_ROOT
from edge_agent.protocol.names import ROOT_LATEST_KEY, ROOTS_BUCKET
from edge_agent.trust.root import TrustRoot
from hub import events as ev
from hub.home.config import HubConfig, load_config
from ledger import json_output
from ledger.encoding import canonical_encode
from ledger.signing import SigningKey
from tests.device_kit import deploy_and_wait
from tests.fleet import REPO_ROOT, Fleet, ledger_state
from tests.test_ledger_witness_nats import enroll, read_until, run_cli

pytestmark = pytest.mark.timeout(240)

DEVICE = "dev-0"


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    return done.returncode == 0


NO_NETWORK = ["unshare", "--net"] if _can_unshare() else []


async def hub(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              isolated: bool = False, answer: str | None = None) -> tuple[int, str, str]:
    """`python -m hub.cli ARGS` as a separate process (the in-process hub keeps
    running). `isolated`: the offline machine, no network where possible."""
    env = env if env is not None else dict(os.environ, PYTHONPATH=str(REPO_ROOT),
                                           COLUMNS="200")
    prefix = NO_NETWORK if isolated else []
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "hub.cli", *args,
        stdin=asyncio.subprocess.DEVNULL if answer is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd or REPO_ROOT.parent)
    out, err = await asyncio.wait_for(
        proc.communicate(None if answer is None else answer.encode()), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def offline_sign(tmp_path: Path, request: Path, key: Path, *extra: str,
                       code: int = 0) -> tuple[str, str]:
    """`hub keys root sign` as on the offline machine: an empty HOME and working
    directory, nothing of the hub's environment (no FLEET_HUB_HOME, no NATS URL); the
    schema check variables are kept so its --json is checked like every other."""
    offline_home = tmp_path / "offline-machine"
    offline_home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(offline_home),
           "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200"}
    for name in (json_output.CHECK_ENV, json_output.LOG_ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    rc, out, err = await hub("keys", "root", "sign", str(request), "--key", str(key),
                             "--yes", *extra, env=env, cwd=offline_home, isolated=True)
    assert rc == code, (rc, out, err)
    assert list(offline_home.iterdir()) == [], "the offline signer wrote into its HOME"
    return out, err


@pytest.fixture
def hub_home(tmp_path: Path) -> HubConfig:
    """A hub home made as an operator would, with the root key put offline at once."""
    done = subprocess.run(
        [sys.executable, "-m", "hub.cli", "init", str(tmp_path / "hub"), "--nats",
         "nats://127.0.0.1:4222", "--offline-root", str(tmp_path / "usb")],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "root key, OFFLINE" in done.stdout, done.stdout
    return load_config(tmp_path / "hub")


def root_key_file(tmp_path: Path) -> Path:
    (path,) = (tmp_path / "usb").glob("root-*.key")
    return path


def current_root(fleet: Fleet) -> int:
    return TrustRoot.load(fleet.config.trust_root_path).version


async def latest_in_kv(fleet: Fleet) -> bytes:
    async with await fleet.client(role="hub") as client:
        kv = await client.nc.jetstream().key_value(ROOTS_BUCKET)
        entry = await kv.get(ROOT_LATEST_KEY)
        assert entry.value is not None
        return entry.value


async def unchanged(fleet: Fleet, before: tuple[Any, ...]) -> None:
    assert (current_root(fleet), ledger_state(fleet), await latest_in_kv(fleet)) == before
    assert fleet.hub.store.verify().ok


async def snapshot(fleet: Fleet) -> tuple[Any, ...]:
    return current_root(fleet), ledger_state(fleet), await latest_in_kv(fleet)


def home_args(fleet: Fleet) -> list[str]:
    return ["--home", str(fleet.config.home)]


async def test_offline_root_story(fleet: Fleet, model_files: dict[str, Path],
                                  tmp_path: Path) -> None:
    home = fleet.config.home
    key = root_key_file(tmp_path)
    pin = tmp_path / "usb" / "trust-root.1.bin"
    assert pin.read_bytes() == fleet.config.trust_root_path.read_bytes()
    assert not any(SigningKey.load(p).keyid == key.stem.removeprefix("root-")
                   for p in (home / "keys").glob("*.key"))
    # The hub runs without the root key: a release, an enrolled device running it.
    await fleet.release_model(model_files["1"], "kws", "1")
    async with await fleet.client() as admin:
        await admin.call("device.enroll", {"device": DEVICE})
        fleet.agent(DEVICE).start()
        await deploy_and_wait(fleet, admin, "1", [DEVICE])
    before = await snapshot(fleet)

    # Online rotation: refused, naming the commands to use instead.
    rc, out, err = await hub("keys", "rotate", "log", *home_args(fleet))
    assert rc == 1, (rc, out, err)
    assert "root key is offline" in err and "hub keys root prepare --rotate log" in err, err
    await unchanged(fleet, before)

    # 1. Prepare on the hub.
    request = tmp_path / "root-2.json"
    rc, out, err = await hub("keys", "root", "prepare", "--rotate", "log", "--out",
                             str(request), *home_args(fleet), "--json")
    assert rc == 0, (rc, out, err)
    prepared = json.loads(out)
    assert prepared["version"] == 2 and prepared["changed"] == ["log"]
    assert prepared["signatures"]["complete"] is False
    new_log = prepared["change"]["keyid"]
    assert (home / "keys" / prepared["key_file"]).is_file()
    await unchanged(fleet, before)  # nothing changes until the import

    # 2. Sign on the offline machine: the review, then the signature.
    out, _ = await offline_sign(tmp_path, request, key, "--root", str(pin), "--json")
    signed = json.loads(out)
    assert signed["digest"] == prepared["digest"]
    assert signed["signatures"]["complete"] is True
    log_role = next(r for r in signed["roles"] if r["role"] == "log")
    assert log_role["added"] == [new_log] and log_role["removed"] == []
    rc, out, err = await hub("keys", "root", "sign", str(request), "--key", str(key))
    assert rc == 1 and "has already signed root 2" in err, (out, err)

    # 3. Import on the hub: recorded, stored, published as the online path does.
    rc, out, err = await hub("keys", "root", "import", str(request), *home_args(fleet),
                             "--json")
    assert rc == 0, (rc, out, err)
    imported = json.loads(out)
    assert imported["version"] == 2 and imported["keyid"] == new_log
    assert imported["role"] == "log" and imported["offline"] is True
    entry = fleet.feed.of_kind(ev.KEYS_ROTATED)[-1]
    assert entry.payload["version"] == 2 and entry.payload["offline"] is True
    assert current_root(fleet) == 2
    assert await latest_in_kv(fleet) == fleet.config.trust_root_path.read_bytes()
    assert (home / "roots" / "root.2.bin").is_file()
    assert (home / "log-keys" / f"{new_log}.vkey").is_file()

    # The device walks to root 2 and installs a release made after the rotation.
    await fleet.release_model(model_files["2"], "kws", "2")
    async with await fleet.client() as admin:
        await deploy_and_wait(fleet, admin, "2", [DEVICE])
    stored = fleet.agent(DEVICE).state_dir / "trust-root.bin"
    assert TrustRoot.load(stored).version == 2

    # The auditor: the ledger verifies with the current log key.
    assert fleet.hub.ledger_publishing is not None
    await fleet.hub.ledger_publishing.checkpointer.sign_now()
    code, out, err = await run_cli("verify", "--home", str(home), "--log-key",
                                   str(home / "log.vkey"))
    assert code == 0, out + err

    # A replayed old document: the root it makes is not newer.
    before = await snapshot(fleet)
    rc, out, err = await hub("keys", "root", "import", str(request), *home_args(fleet))
    assert rc == 1 and "not newer than the trusted version 2" in err, (out, err)
    await unchanged(fleet, before)


def rewrite(request: Path, target: Path, change: Any) -> None:
    """A copy of the request whose document `change(doc)` altered, with its digest
    recomputed (anyone can recompute a digest: only signatures protect the document)."""
    import blake3

    data = json.loads(request.read_text())
    doc = proto.SignedEnvelope(bytes.fromhex(data["signed"]), ()).document("root")
    change(doc)
    signed = canonical_encode(doc)
    data["signed"], data["digest"] = signed.hex(), blake3.blake3(signed).hexdigest()
    target.write_text(json.dumps(data))


def add_signature(request: Path, target: Path, key: SigningKey) -> None:
    """A copy of the request with a signature by `key` added outside the CLI."""
    data = json.loads(request.read_text())
    signed = bytes.fromhex(data["signed"])
    data["signatures"].append({"keyid": key.keyid, "sig": key.sign(DOMAIN_ROOT, signed).hex()})
    target.write_text(json.dumps(data))


async def test_refusals_leave_root_and_ledger_unchanged(fleet: Fleet, tmp_path: Path) -> None:
    key_a = root_key_file(tmp_path)
    root_a = SigningKey.load(key_a)
    before = await snapshot(fleet)

    async def import_refused(path: Path, *words: str) -> None:
        rc, out, err = await hub("keys", "root", "import", str(path), *home_args(fleet))
        assert rc == 1, (rc, out, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
        for word in words:
            assert word in err, err
        await unchanged(fleet, before)

    request = tmp_path / "root-2.json"
    rc, out, err = await hub("keys", "root", "prepare", "--rotate", "director", "--out",
                             str(request), *home_args(fleet))
    assert rc == 0 and "unsigned" in out, (out, err)

    # The review a person reads before signing, and a "no": nothing is signed.
    text = request.read_text()
    rc, out, err = await hub("keys", "root", "sign", str(request), "--key", str(key_a),
                             answer="n\n")
    assert rc == 2 and "not signed" in err, (rc, out, err)
    new_director = json.loads(text)["change"]["keyid"]
    for line in ("trust root 1 -> 2", "director: threshold 1 -> 1", f"+ {new_director}",
                 "unchanged: log, release, root, timestamp", "root keys of root 1: 0 of 1"):
        assert line in out + err, out + err
    assert request.read_text() == text

    # Below threshold: nobody signed yet.
    await import_refused(request, "signed by neither the old nor its own root keys")

    # Wrong key: the CLI refuses to sign with it; a signature made anyway does not count.
    log_key = fleet.config.home / "keys" / "log.key"
    _, err = await offline_sign(tmp_path, request, log_key, code=1)
    assert "is not a root key of root 1 or root 2" in err, err
    wrong = tmp_path / "wrong.json"
    add_signature(request, wrong, SigningKey.load(log_key))
    await import_refused(wrong, "0 valid signature(s)")

    # Version skip: root 3 built on root 1.
    skip = tmp_path / "skip.json"
    rewrite(request, skip, lambda d: d.update(version=3))
    _, err = await offline_sign(tmp_path, skip, key_a, code=1)
    assert "version 3, not 2" in err, err
    add_signature(skip, skip, root_a)  # signed anyway, outside the CLI
    await import_refused(skip, "does not follow the trusted version 1")

    # Tampered after signing: a key slipped into the director role.
    signed = tmp_path / "signed.json"
    await offline_sign(tmp_path, request, key_a, "--out", str(signed))
    rogue = SigningKey.generate()

    def slip_in(doc: dict[str, Any]) -> None:
        doc["keys"][rogue.keyid] = {"keytype": "ed25519", "public": rogue.public.raw}
        doc["roles"]["director"]["keyids"].append(rogue.keyid)

    tampered = tmp_path / "tampered.json"
    rewrite(signed, tampered, slip_in)
    await import_refused(tampered, "signed by neither the old nor its own root keys")
    _, err = await offline_sign(tmp_path, tampered, key_a, code=1)
    assert "does not verify" in err, err
    # The file itself edited without fixing the digest: refused before any check.
    data = json.loads(signed.read_text())
    data["signed"] = data["signed"][:-2] + ("00" if data["signed"][-2:] != "00" else "01")
    tampered.write_text(json.dumps(data))
    await import_refused(tampered, "digest does not match")
    # Not a request at all.
    (tmp_path / "junk.json").write_text("{}")
    await import_refused(tmp_path / "junk.json", "not a root signing request")

    # The genuine signed one goes in; nothing above left a trace.
    rc, out, err = await hub("keys", "root", "import", str(signed), *home_args(fleet))
    assert rc == 0 and "trust root version 2 imported" in out, (out, err)
    assert current_root(fleet) == 2
    assert [e.payload["version"] for e in fleet.feed.of_kind(ev.KEYS_ROTATED)] == [2]


async def test_a_second_root_key_and_a_threshold_of_two(fleet: Fleet, tmp_path: Path) -> None:
    """A new root key made offline joins the root role with threshold 2: root 2 needs
    the old key (root 1's threshold) and both keys (its own); from then on both sign in
    turn, and one signature alone is refused."""
    key_a = root_key_file(tmp_path)
    key_b = tmp_path / "usb" / "root-b.key"
    out, _ = await offline_keygen(tmp_path, key_b)
    made = json.loads(out)
    assert made["keyid"] == SigningKey.load(key_b).keyid

    request = tmp_path / "root-2.json"
    rc, out, err = await hub("keys", "root", "prepare", "--rotate", "root", "--pubkey",
                             made["public"], "--threshold", "2", "--out", str(request),
                             *home_args(fleet))
    assert rc == 0, (out, err)
    out, _ = await offline_sign(tmp_path, request, key_a, "--json")
    assert json.loads(out)["signatures"]["new"]["signed_by"] == [SigningKey.load(key_a).keyid]
    assert json.loads(out)["signatures"]["complete"] is False
    before = await snapshot(fleet)
    rc, out, err = await hub("keys", "root", "import", str(request), *home_args(fleet))
    assert rc == 1 and "signed by the old keys only" in err, (out, err)
    await unchanged(fleet, before)
    await offline_sign(tmp_path, request, key_b)
    rc, out, err = await hub("keys", "root", "import", str(request), *home_args(fleet),
                             "--json")
    assert rc == 0, (out, err)
    assert json.loads(out)["role"] == "root" and json.loads(out)["threshold"] == 2
    root = TrustRoot.load(fleet.config.trust_root_path)
    assert root.version == 2 and root.roles["root"].threshold == 2

    # Root 3 (a log key): one root key is below the threshold of 2, both are enough.
    request = tmp_path / "root-3.json"
    rc, out, err = await hub("keys", "root", "prepare", "--rotate", "log", "--out",
                             str(request), *home_args(fleet))
    assert rc == 0, (out, err)
    out, _ = await offline_sign(tmp_path, request, key_b)
    assert "more root keys must sign" in out, out
    before = await snapshot(fleet)
    rc, out, err = await hub("keys", "root", "import", str(request), *home_args(fleet))
    assert rc == 1 and "1 valid signature(s) from the root role, 2 required" in err, err
    await unchanged(fleet, before)
    out, _ = await offline_sign(tmp_path, request, key_a)
    assert "complete" in out, out
    rc, out, err = await hub("keys", "root", "import", str(request), *home_args(fleet))
    assert rc == 0, (out, err)
    assert current_root(fleet) == 3

    # Root 4 retires the first root key: root 3's two keys sign, and root 4's own (B).
    request = tmp_path / "root-4.json"
    id_a = SigningKey.load(key_a).keyid
    rc, out, err = await hub("keys", "root", "prepare", "--revoke", id_a, "--threshold", "1",
                             "--out", str(request), *home_args(fleet))
    assert rc == 0, (out, err)
    await offline_sign(tmp_path, request, key_a)
    await offline_sign(tmp_path, request, key_b)
    rc, out, err = await hub("keys", "root", "import", str(request), *home_args(fleet))
    assert rc == 0 and "removed from the root role" in out, (out, err)
    root = TrustRoot.load(fleet.config.trust_root_path)
    assert root.roles["root"].keyids == (made["keyid"],) and root.roles["root"].threshold == 1
    assert fleet.feed.of_kind(ev.KEYS_REVOKED)[-1].payload["offline"] is True


async def prepare_sign_import(fleet: Fleet, tmp_path: Path, out_name: str,
                              *change: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One trust root change through the three steps: (the offline review, the import)."""
    request = tmp_path / out_name
    rc, out, err = await hub("keys", "root", "prepare", *change, "--out", str(request),
                             *home_args(fleet))
    assert rc == 0 and "unsigned" in out, (rc, out, err)
    out, _ = await offline_sign(tmp_path, request, root_key_file(tmp_path), "--json")
    reviewed = json.loads(out)
    assert reviewed["signatures"]["complete"] is True
    rc, out, err = await hub("keys", "root", "import", str(request), *home_args(fleet),
                             "--json")
    assert rc == 0, (rc, out, err)
    return reviewed, json.loads(out)


async def listed_witnesses(fleet: Fleet) -> dict[str, str]:
    rc, out, err = await hub("witness", "list", "--json", *home_args(fleet))
    assert rc == 0, (rc, out, err)
    return {w["name"]: w["keyid"] for w in json.loads(out)["witnesses"]}


async def test_witnesses_added_and_removed_with_the_root_key_offline(
    fleet: Fleet, tmp_path: Path,
) -> None:
    """`hub witness add|remove` on an offline-root hub refuses, naming the commands; the
    same change through prepare / sign (offline) / import is recorded as the online
    command records it, lands in HOME/witnesses, and a real `ledger witness` process
    then has its cosignature stored by the hub."""
    home = fleet.config.home
    names = ("witness.example/w1", "witness.example/w2")
    vkeys = {}
    for name in names:
        code, out, err = await run_cli("witness-key", "--out",
                                       str(tmp_path / f"{name[-2:]}.key"), "--name", name)
        assert code == 0, err
        vkeys[name] = out.strip()
    w1, w2 = names

    # Online: refused with the three commands to run, nothing changed.
    before = await snapshot(fleet)
    rc, out, err = await hub("witness", "add", w1, "--pubkey", vkeys[w1], *home_args(fleet))
    assert rc == 1, (rc, out, err)
    assert "root key is offline" in err and "hub keys root prepare --add-witness " \
        f"{w1} --pubkey" in err and "--out root-2.json" in err, err
    await unchanged(fleet, before)

    # Offline: the review names the witness; the import records what `hub witness add`
    # records (keys.rotated, role witness, its name and vkey), plus offline: true.
    reviewed, imported = await prepare_sign_import(
        fleet, tmp_path, "root-2.json", "--add-witness", w1, "--pubkey", vkeys[w1])
    assert reviewed["changed"] == ["witness"] and reviewed["change"]["name"] == w1
    role = next(r for r in reviewed["roles"] if r["role"] == "witness")
    (w1_id,) = role["added"]
    assert role["names"][w1_id] == w1 and role["threshold"] == 1
    assert imported["role"] == "witness" and imported["name"] == w1
    assert imported["keyid"] == w1_id and imported["offline"] is True
    entry = fleet.feed.of_kind(ev.KEYS_ROTATED)[-1]
    assert entry.payload["role"] == "witness" and entry.payload["name"] == w1
    assert entry.payload["vkey"] == vkeys[w1] and entry.payload["offline"] is True
    assert set(entry.payload) == {"role", "keyid", "threshold", "version", "root",
                                  "key_file", "name", "vkey", "offline", "command"}
    assert current_root(fleet) == 2
    assert await latest_in_kv(fleet) == fleet.config.trust_root_path.read_bytes()
    assert await listed_witnesses(fleet) == {w1: w1_id}
    assert vkeys[w1] in (home / "witnesses").read_text()

    # A real `ledger witness` process cosigns the next checkpoint; the hub stores it.
    assert fleet.hub.ledger_publishing is not None
    checkpointer = fleet.hub.ledger_publishing.checkpointer
    await checkpointer.sign_now()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli", "witness", "--nats", fleet.url_as("witness"),
        "--log-vkey", str(home / "log.vkey"), "--key", str(tmp_path / "w1.key"),
        "--name", w1, "--state", str(tmp_path / "w1-state.json"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        await read_until(proc.stdout, "cosigned")  # caught up, and subscribed
        await enroll(fleet, "dev-cosigned")
        cp = await checkpointer.sign_now()
        assert cp is not None
        line = await read_until(proc.stdout, f"tree size {cp.size};")
        assert w1 in line, line  # the hub stored it
        stored = checkpointer.checkpoints.get(cp.size)
        assert stored is not None and [c.name for c in stored.cosignatures] == [w1]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)

    # The last witness cannot go (as online); its replacement comes first.
    rc, out, err = await hub("keys", "root", "prepare", "--remove-witness", w1, "--out",
                             str(tmp_path / "no.json"), *home_args(fleet))
    assert rc == 1 and "is the only witness" in err, (rc, out, err)
    assert not (tmp_path / "no.json").exists()
    _, imported = await prepare_sign_import(
        fleet, tmp_path, "root-3.json", "--add-witness", w2, "--pubkey", vkeys[w2])
    assert imported["name"] == w2 and imported["version"] == 3

    before = await snapshot(fleet)
    rc, out, err = await hub("witness", "remove", w1, *home_args(fleet))
    assert rc == 1, (rc, out, err)
    assert "root key is offline" in err and f"hub keys root prepare --remove-witness {w1}" \
        in err, err
    await unchanged(fleet, before)

    reviewed, imported = await prepare_sign_import(
        fleet, tmp_path, "root-4.json", "--remove-witness", w1)
    role = next(r for r in reviewed["roles"] if r["role"] == "witness")
    assert role["removed"] == [w1_id] and role["names"][w1_id] == w1
    assert imported["keyid"] == w1_id and imported["version"] == 4
    entry = fleet.feed.of_kind(ev.KEYS_REVOKED)[-1]
    assert (entry.payload["role"], entry.payload["name"]) == ("witness", w1)
    assert entry.payload["offline"] is True
    assert set(await listed_witnesses(fleet)) == {w2}
    assert vkeys[w1] not in (home / "witnesses").read_text()
    assert vkeys[w2] in (home / "witnesses").read_text()
    root = TrustRoot.load(fleet.config.trust_root_path)
    assert root.version == 4 and w1_id not in root.keys
    assert fleet.hub.store.verify().ok


async def offline_keygen(tmp_path: Path, path: Path) -> tuple[str, str]:
    offline_home = tmp_path / "offline-machine"
    offline_home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(offline_home),
           "PYTHONPATH": str(REPO_ROOT)}
    for name in (json_output.CHECK_ENV, json_output.LOG_ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    rc, out, err = await hub("keys", "root", "keygen", "--out", str(path), "--json",
                             env=env, cwd=offline_home, isolated=True)
    assert rc == 0, (out, err)
    return out, err


async def test_export_offline_then_online_rotation_points_to_prepare(
    tmp_path: Path,
) -> None:
    """`hub keys root export-offline` on a home that had the root key: moved out (not
    into the home), with a copy of the root; a second export finds nothing to move."""
    home = tmp_path / "h"
    rc, _out, err = await hub("init", str(home), "--no-auth")
    assert rc == 0, err
    root_id = SigningKey.load(home / "keys" / "root.key").keyid
    rc, _out, err = await hub("keys", "root", "export-offline", "--out",
                             str(home / "inside"), "--home", str(home))
    assert rc == 2 and "inside the hub's home" in err, err
    rc, _out, err = await hub("keys", "root", "export-offline", "--out",
                             str(tmp_path / "usb"), "--home", str(home))
    assert rc == 0, err
    assert not (home / "keys" / "root.key").exists()
    assert SigningKey.load(tmp_path / "usb" / f"root-{root_id}.key").keyid == root_id
    assert (tmp_path / "usb" / f"root-{root_id}.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "usb" / "trust-root.1.bin").is_file()
    rc, _out, err = await hub("keys", "root", "export-offline", "--out",
                             str(tmp_path / "usb2"), "--home", str(home))
    assert rc == 2 and "offline already" in err, err
    # An unreadable request is a usage error; a request for a second change too.
    rc, _out, err = await hub("keys", "root", "sign", str(tmp_path / "none.json"), "--key",
                             str(tmp_path / "usb" / f"root-{root_id}.key"))
    assert rc == 2 and "cannot read" in err, err
    rc, _out, err = await hub("keys", "root", "prepare", "--rotate", "log", "--revoke",
                             root_id, "--out", str(tmp_path / "x.json"), "--home", str(home))
    assert rc == 1 and "give one change" in err, err


def test_import_refuses_a_role_key_this_hub_does_not_hold() -> None:
    """A root prepared on another hub (its new log key is not in this hub's HOME/keys)
    is refused even though the root keys signed it: the hub could not sign with it."""
    from hub.keys.keyring import KeyChangeRefused
    from hub.keys.offline import prepare_request, read_signed_root, sign_request

    keys = {role: SigningKey.generate() for role in ("root", "release", "director", "log")}
    current = TrustRoot.from_envelope(TrustRoot.build({r: [k] for r, k in keys.items()}))
    online = [k for r, k in keys.items() if r != "root"]
    request, new_key = prepare_request(current, online, rotate="log")
    assert new_key is not None
    data = sign_request(request, keys["root"]).envelope().encode()
    with pytest.raises(KeyChangeRefused, match="which this hub does not hold"):
        read_signed_root(current, data, online)
    planned, change = read_signed_root(current, data, [*online, new_key])
    assert planned.added and change.keyid == new_key.keyid and change.version == 2


def test_a_witness_root_is_prepared_and_read_back_with_the_online_rules() -> None:
    """Pure: `prepare_request` builds a witness root with the online builders (their
    refusals too), the offline signature makes it importable, and `--rotate witness` /
    `--revoke WITNESS_KEYID` point to the witness options."""
    from hub.keys.keyring import KeyChangeRefused
    from hub.keys.offline import prepare_request, read_signed_root, sign_request

    keys = {role: SigningKey.generate() for role in ("root", "release", "director", "log")}
    current = TrustRoot.from_envelope(TrustRoot.build({r: [k] for r, k in keys.items()}))
    online = [k for r, k in keys.items() if r != "root"]
    witness = SigningKey.generate()
    request, new_key = prepare_request(current, online, add_witness=("w.example/1",
                                       witness.public), origin="hub.example/log")
    assert new_key is None and request.change["action"] == "add-witness"
    planned, change = read_signed_root(
        current, sign_request(request, keys["root"]).envelope().encode(), online)
    assert (change.role, change.keyid, planned.added) == ("witness", witness.keyid, True)
    root_2 = TrustRoot.from_envelope(change.root)
    assert root_2.names[witness.keyid] == "w.example/1"
    assert root_2.names[keys["log"].keyid] == "hub.example/log"
    for kwargs, words in (
        ({"remove_witness": "w.example/1"}, "is the only witness"),
        ({"add_witness": ("w.example/1", SigningKey.generate().public)}, "already"),
        ({"rotate": "witness"}, "--add-witness"),
        ({"revoke": witness.keyid}, "--remove-witness w.example/1"),
        ({"remove_witness": "w.example/1", "rotate": "log"}, "give one change"),
    ):
        with pytest.raises(KeyChangeRefused, match=words):
            prepare_request(root_2, online, origin="hub.example/log", **kwargs)
