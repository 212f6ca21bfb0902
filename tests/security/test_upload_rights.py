"""Class 3 of issue 12: over-broad rights on blobs.

Operators have no Object Store rights: they stage an upload on their own
`upload.<keyid>.<id>` subjects of the hub's UPLOADS stream and the hub checks it and
stores it (hub/uploads.py). Devices read only the `releases` bucket, which holds released
model blobs, never validation sets or unreleased models.

On a real nats-server with the configuration `hub init` writes and a real hub:

- an operator of each role cannot purge or write `models` or `releases`, read `models`,
  nor publish to (or read) another operator's upload subject;
- a device cannot read a validation set or an unreleased model, by any read path it has
  (direct get in both forms, stream msg get, a consumer, stream info, a plain subscribe);
- a tampered upload (wrong digest, wrong size, oversize, too many chunks, a gap, a
  missing chunk, an unknown upload id, another operator's upload id, a malformed id) is
  refused with a one-line error that names what was wrong and is counted; nothing lands
  in any bucket, the upload is purged, the ledger head is unchanged and verifies.

Each attack asserts that it failed AND that nothing changed (message counts and last
sequences of OBJ_models, OBJ_releases and UPLOADS, the ledger head, `store.verify()`).
One hub and one server serve the module; its last tests run the happy path to a real
agent and the reconciler's restore of a released blob.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from edge_agent.errors import FetchError
from edge_agent.protocol.names import (
    MODELS_BUCKET,
    RELEASES_BUCKET,
    UPLOAD_CHUNK_BYTES,
    UPLOAD_CHUNK_HEADER,
    UPLOADS_STREAM,
    upload_subject,
)
from edge_agent.slots import SlotStore
from edge_agent.transport import objects
from edge_agent.transport.connect import NatsAuth
from hub.client import HubClient
from hub.errors import HubError
from hub.home.config import init_home, set_nats_url
from hub.home.nats_config import server_conf_path
from hub.uploads import copy_blob
from ledger.signing import SigningKey
from testkit.modelgen import model_for_version
from testkit.nats_server import EmbeddedNats
from tests.device_kit import deploy_and_wait
from tests.fleet import Fleet, ledger_state
from tests.test_end_to_end import run_ledger_cli
from tests.test_nats_permissions import Conn

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

OBJ_MODELS, OBJ_RELEASES = f"OBJ_{MODELS_BUCKET}", f"OBJ_{RELEASES_BUCKET}"
STREAMS = (OBJ_MODELS, OBJ_RELEASES, UPLOADS_STREAM)
ROLES = ("admin", "registrant", "approver", "operator", "auditor")
DEVICE = "dev-a"


def meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


@dataclass
class Setting:
    fleet: Fleet
    js: JetStreamContext  # the hub's own
    keys: dict[str, SigningKey]
    conns: dict[str, Conn]  # raw NATS connections: each operator role and the device
    released: str  # digest of released kws/1
    unreleased: str  # digest of registered-only kws/2
    dataset: str  # digest of kws/1's validation set

    async def snapshot(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for stream in STREAMS:
            info = await self.js.stream_info(stream)
            state[stream] = (info.state.messages, info.state.last_seq)
        state["ledger"] = ledger_state(self.fleet)
        return state

    async def upload_left(self, keyid: str, upload_id: str) -> int:
        """Messages still staged under one upload (0: purged or never there)."""
        subject = upload_subject(keyid, upload_id)
        info = await self.js.stream_info(UPLOADS_STREAM, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)

    async def left_after_purge(self, keyid: str, upload_id: str) -> int:
        """`upload_left` once the purge had time: a command refused before it read its
        upload purges it beside the refusal (hub.service.nats.discard_upload), so the
        answer can come first."""
        deadline = time.monotonic() + 10.0
        while (left := await self.upload_left(keyid, upload_id)) and (
                time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        return left

    def client(self, role: str) -> Awaitable[HubClient]:
        return self.fleet.client(self.keys[role])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setting(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setting]:
    root: Path = tmp_path_factory.mktemp("uploads")
    config = init_home(root / "hub", "nats://127.0.0.1:4222")
    server = EmbeddedNats(store_dir=root / "nats",
                          config_file=server_conf_path(config.home)).start()
    set_nats_url(config.home, server.url)
    fleet = await Fleet(root, server.url).start()
    conns: dict[str, Conn] = {}
    try:
        keys = {"admin": fleet.admin_key, "approver": fleet.approver_key}
        models = {}
        for version in ("1", "2"):
            models[version] = root / f"kws-{version}.tflite"
            models[version].write_bytes(model_for_version(int(version)))
        async with await fleet.client() as admin:
            for role in ("registrant", "operator", "auditor"):
                keys[role] = SigningKey.generate()
                await admin.call("operator.add", {"name": role, "roles": [role],
                                                  "public": keys[role].public.raw})
            await admin.call("device.enroll", {"device": DEVICE})
        await fleet.release_model(models["1"], "kws", "1")
        async with await fleet.client() as admin:
            await admin.register_model(models["2"], "kws", "2")
        dataset = fleet.root / "kws-1-validation.npz"
        assert dataset.exists()
        for role in ROLES:
            conns[role] = await Conn.open(server.url, config.operator_auth(keys[role]))
        device_key = SigningKey.load(fleet.bundle(DEVICE) / "device.key")
        conns["device"] = await Conn.open(server.url,
                                          NatsAuth.for_device(DEVICE, device_key.private_raw()))

        def digest(path: Path) -> str:
            return blake3.blake3(path.read_bytes()).hexdigest()

        yield Setting(fleet, fleet.hub.edge.js, keys, conns, digest(models["1"]),
                      digest(models["2"]), digest(dataset))
    finally:
        for conn in conns.values():
            await conn.close()
        await fleet.stop()
        server.close()


# ---------------------------------------------------------------- operators


def operator_attacks(other: str) -> list[tuple[str, str, bytes]]:
    """(case id, subject, body) an operator publishes or requests; `other` is another
    operator's key id."""
    blob = "b" * 64
    return [
        *[(f"purge-{s}", f"$JS.API.STREAM.PURGE.{s}", b"") for s in STREAMS],
        *[(f"delete-{s}", f"$JS.API.STREAM.DELETE.{s}", b"") for s in STREAMS],
        *[(f"msg-delete-{s}", f"$JS.API.STREAM.MSG.DELETE.{s}", b'{"seq":1}')
          for s in STREAMS],
        *[(f"chunk-{b}", f"$O.{b}.C.forged", b"evil chunk")
          for b in (MODELS_BUCKET, RELEASES_BUCKET)],
        *[(f"meta-{b}", meta_subject(b, blob), b"{}") for b in (MODELS_BUCKET, RELEASES_BUCKET)],
        ("direct-get-models", f"$JS.API.DIRECT.GET.{OBJ_MODELS}", b'{"seq":1}'),
        ("msg-get-models", f"$JS.API.STREAM.MSG.GET.{OBJ_MODELS}", b'{"seq":1}'),
        ("consumer-models", f"$JS.API.CONSUMER.CREATE.{OBJ_MODELS}", b"{}"),
        ("consumer-uploads", f"$JS.API.CONSUMER.CREATE.{UPLOADS_STREAM}", b"{}"),
        ("info-uploads", f"$JS.API.STREAM.INFO.{UPLOADS_STREAM}", b""),
        ("others-upload", upload_subject(other, "0" * 32), b"a chunk in another's upload"),
    ]


def operator_cases() -> list[Any]:
    return [pytest.param(role, case, subject, body, id=f"{role}-{case}")
            for role in ROLES
            for case, subject, body in operator_attacks("{other}")]


@pytest.mark.parametrize(("role", "case", "subject", "body"), operator_cases())
async def test_an_operator_cannot_touch_the_buckets_or_anothers_upload(
    setting: Setting, role: str, case: str, subject: str, body: bytes
) -> None:
    other = setting.keys["auditor" if role != "auditor" else "admin"].keyid
    subject = subject.replace("{other}", other)
    conn = setting.conns[role]
    before = await setting.snapshot()
    await conn.refused(subject, conn.nc.request(subject, body, timeout=2))
    assert await setting.snapshot() == before
    assert setting.fleet.hub.store.verify().ok


@pytest.mark.parametrize("role", ROLES)
async def test_an_operator_cannot_read_anothers_uploads(setting: Setting, role: str) -> None:
    conn = setting.conns[role]
    other = setting.keys["admin" if role != "admin" else "auditor"].keyid
    for subject in ("upload.>", f"upload.{other}.>"):
        await conn.refused(subject, conn.nc.subscribe(subject))


# ---------------------------------------------------------------- devices


def device_reads(setting: Setting) -> list[tuple[str, str, bytes]]:
    """Every way a device could read from `models` or the staging stream."""
    out = []
    for name, digest in (("dataset", setting.dataset), ("unreleased", setting.unreleased),
                         ("released-in-models", setting.released)):
        meta = meta_subject(MODELS_BUCKET, digest)
        out += [
            (f"direct-get-{name}", f"$JS.API.DIRECT.GET.{OBJ_MODELS}",
             f'{{"last_by_subj":"{meta}"}}'.encode()),
            (f"direct-get-subject-{name}", f"$JS.API.DIRECT.GET.{OBJ_MODELS}.{meta}", b""),
            (f"msg-get-{name}", f"$JS.API.STREAM.MSG.GET.{OBJ_MODELS}",
             f'{{"last_by_subj":"{meta}"}}'.encode()),
        ]
    return [
        *out,
        ("consumer", f"$JS.API.CONSUMER.CREATE.{OBJ_MODELS}", b'{"config":{}}'),
        ("consumer-filtered", f"$JS.API.CONSUMER.CREATE.{OBJ_MODELS}.x.$O.{MODELS_BUCKET}.C.>",
         b'{"config":{}}'),
        ("durable", f"$JS.API.CONSUMER.DURABLE.CREATE.{OBJ_MODELS}.x", b'{"config":{}}'),
        ("info", f"$JS.API.STREAM.INFO.{OBJ_MODELS}", b""),
        ("uploads-consumer", f"$JS.API.CONSUMER.CREATE.{UPLOADS_STREAM}", b'{"config":{}}'),
        ("uploads-msg-get", f"$JS.API.STREAM.MSG.GET.{UPLOADS_STREAM}", b'{"seq":1}'),
        ("uploads-direct-get", f"$JS.API.DIRECT.GET.{UPLOADS_STREAM}", b'{"seq":1}'),
        ("upload-publish", upload_subject(setting.keys["admin"].keyid, "0" * 32), b"chunk"),
    ]


async def test_a_device_cannot_read_a_validation_set_or_an_unreleased_model(
    setting: Setting
) -> None:
    conn = setting.conns["device"]
    before = await setting.snapshot()
    for case, subject, body in device_reads(setting):
        conn.errors.clear()
        await conn.refused(subject, conn.nc.request(subject, body, timeout=2))
        assert await setting.snapshot() == before, case
    for subject in (f"$O.{MODELS_BUCKET}.>", f"$O.{MODELS_BUCKET}.C.>", "upload.>"):
        await conn.refused(subject, conn.nc.subscribe(subject))
    # Through the agent's own reader (direct gets): the models bucket is not there for
    # it ...
    for digest in (setting.dataset, setting.unreleased):
        with pytest.raises(FetchError):  # refused by the server: no answer, a timeout
            # 3 s, not the agent's 10: the same direct get of a released blob is answered
            # in milliseconds (test_a_device_reads_the_released_blob_from_releases).
            await objects.object_ref(conn.nc, MODELS_BUCKET, digest, 1 << 30, timeout=3)
        # ... and neither is in the releases bucket.
        with pytest.raises(FetchError, match="not in the object store"):
            await objects.object_ref(conn.nc, RELEASES_BUCKET, digest, 1 << 30)
    assert await setting.snapshot() == before


async def test_a_device_reads_the_released_blob_from_releases(setting: Setting) -> None:
    nc = setting.conns["device"].nc
    info = await setting.js.stream_info(OBJ_RELEASES)
    ref = await objects.object_ref(nc, RELEASES_BUCKET, setting.released, 1 << 30)
    assert ref.size is not None
    data = b"".join([c.data async for c in objects.iter_chunks_from(
        nc, RELEASES_BUCKET, ref, ref.size)])
    assert blake3.blake3(data).hexdigest() == setting.released
    assert (await setting.js.stream_info(OBJ_RELEASES)).state.messages == info.state.messages


# ---------------------------------------------------------------- tampered uploads


async def stage(client: HubClient, chunks: list[tuple[str, bytes]],
                upload_id: str | None = None) -> str:
    """Publish `chunks` (index header, data) as one upload of `client`'s key, acked."""
    upload_id = upload_id or secrets.token_hex(16)
    js = client.nc.jetstream()
    for label, data in chunks:
        await js.publish(upload_subject(client.key.keyid, upload_id), data,
                         stream=UPLOADS_STREAM, headers={UPLOAD_CHUNK_HEADER: label})
    return upload_id


def split(data: bytes) -> list[tuple[str, bytes]]:
    parts = [data[i:i + UPLOAD_CHUNK_BYTES] for i in range(0, len(data), UPLOAD_CHUNK_BYTES)]
    return [(str(i), part) for i, part in enumerate(parts)]


BIG = bytes(range(256)) * (3 * UPLOAD_CHUNK_BYTES // 256 - 7)  # three chunks, last short
BIG_DIGEST = blake3.blake3(BIG).hexdigest()
Case = Callable[[Setting, HubClient], Awaitable[tuple[str, dict[str, Any]]]]


async def wrong_digest(s: Setting, c: HubClient) -> tuple[str, dict[str, Any]]:
    uid = await stage(c, split(BIG))
    return uid, {"upload": uid, "digest": "0" * 64, "size": len(BIG)}


async def wrong_size_short(s: Setting, c: HubClient) -> tuple[str, dict[str, Any]]:
    uid = await stage(c, split(BIG))
    return uid, {"upload": uid, "digest": BIG_DIGEST, "size": len(BIG) - 1}


async def wrong_size_long(s: Setting, c: HubClient) -> tuple[str, dict[str, Any]]:
    uid = await stage(c, split(BIG))
    return uid, {"upload": uid, "digest": BIG_DIGEST, "size": len(BIG) + 1}


async def oversize_claim(s: Setting, c: HubClient) -> tuple[str, dict[str, Any]]:
    uid = await stage(c, split(BIG))
    return uid, {"upload": uid, "digest": BIG_DIGEST,
                 "size": s.fleet.config.uploads_max_bytes + 1}


async def extra_chunks(s: Setting, c: HubClient) -> tuple[str, dict[str, Any]]:
    """More data staged than the command states: refused before it is read."""
    uid = await stage(c, [*split(BIG), ("3", b"x" * UPLOAD_CHUNK_BYTES),
                          ("4", b"y" * UPLOAD_CHUNK_BYTES)])
    small = BIG[:UPLOAD_CHUNK_BYTES]
    return uid, {"upload": uid, "digest": blake3.blake3(small).hexdigest(), "size": len(small)}


async def gap(s: Setting, c: HubClient) -> tuple[str, dict[str, Any]]:
    first, second, third = split(BIG)
    uid = await stage(c, [first, third, ("3", second[1])])  # chunk 1 never sent
    return uid, {"upload": uid, "digest": BIG_DIGEST, "size": len(BIG)}


async def missing_last(s: Setting, c: HubClient) -> tuple[str, dict[str, Any]]:
    uid = await stage(c, split(BIG)[:2])
    return uid, {"upload": uid, "digest": BIG_DIGEST, "size": len(BIG)}


async def unknown(s: Setting, c: HubClient) -> tuple[str, dict[str, Any]]:
    uid = secrets.token_hex(16)
    return uid, {"upload": uid, "digest": BIG_DIGEST, "size": len(BIG)}


async def malformed(s: Setting, c: HubClient) -> tuple[str, dict[str, Any]]:
    return "", {"upload": "*", "digest": BIG_DIGEST, "size": len(BIG)}


TAMPERED: list[tuple[str, Case, str, tuple[str, ...]]] = [
    ("wrong-digest", wrong_digest, "digest", ("does not match digest 0000000000000000",)),
    ("wrong-size-short", wrong_size_short, "size", ("is not", "bytes")),
    ("wrong-size-long", wrong_size_long, "size", ("is not", "bytes")),
    ("oversize", oversize_claim, "too large", ("over the", "limit for uploads")),
    ("extra-chunks", extra_chunks, "size", ("5 chunks, more than the 1",)),
    ("gap", gap, "missing chunk", ("missing chunk 1",)),
    ("missing-last", missing_last, "missing chunk", ("2 of the 3 chunks", "missing chunk")),
    ("unknown-id", unknown, "unknown upload", ("unknown upload",)),
    ("malformed-id", malformed, "invalid", ("invalid upload id",)),
]


@pytest.mark.parametrize(("case", "make", "reason", "words"), TAMPERED,
                         ids=[t[0] for t in TAMPERED])
async def test_a_tampered_upload_is_refused_and_lands_nowhere(
    setting: Setting, case: str, make: Case, reason: str, words: tuple[str, ...]
) -> None:
    hub = setting.fleet.hub
    async with await setting.client("registrant") as client:
        upload_id, body = await make(setting, client)
        before = await setting.snapshot()
        counted = hub.edge.uploads.refused[reason]
        with pytest.raises(HubError) as info:
            await client.call("model.register", {"name": "tampered", "version": "1", **body})
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    after = await setting.snapshot()
    # Nothing reached a bucket and the ledger did not move; the upload is gone.
    assert {k: after[k] for k in (OBJ_MODELS, OBJ_RELEASES, "ledger")} == \
        {k: before[k] for k in (OBJ_MODELS, OBJ_RELEASES, "ledger")}
    assert hub.store.verify().ok
    if upload_id:
        assert await setting.upload_left(client.key.keyid, upload_id) == 0
    assert hub.edge.uploads.refused[reason] == counted + 1
    async with await setting.client("auditor") as auditor:
        status = await auditor.call("status")
    assert status["refused_uploads"][reason] == counted + 1


async def test_ledger_verify_passes_after_the_refused_uploads(setting: Setting) -> None:
    """`ledger verify` (the CLI, another process) on the ledger the attacks above left."""
    cli = run_ledger_cli("verify", "--db", setting.fleet.config.database_url())
    assert cli.returncode == 0, cli.stdout + cli.stderr


async def test_a_validation_set_over_its_limit_is_refused_unread(setting: Setting) -> None:
    async with await setting.client("admin") as client:
        uid = await stage(client, split(BIG))
        before = await setting.snapshot()
        with pytest.raises(HubError, match=r"validation data is \d+ bytes, over the"):
            await client.call("model.validate", {"name": "kws", "version": "2",
                                                 "data_upload": uid, "data_digest": BIG_DIGEST,
                                                 "data_size": 65 * 1024 * 1024})
        assert await setting.left_after_purge(client.key.keyid, uid) == 0
    after = await setting.snapshot()
    assert (after[OBJ_MODELS], after["ledger"]) == (before[OBJ_MODELS], before["ledger"])


async def test_another_operators_upload_id_is_unknown_and_stays_its_owners(
    setting: Setting
) -> None:
    """Naming another operator's upload reads one's own (empty) subject: refused, and
    the owner's upload is untouched; the owner can still use it."""
    model = setting.fleet.root / "kws-1.tflite"
    async with await setting.client("registrant") as owner, \
            await setting.client("admin") as thief:
        staged = await owner.upload(model)
        before = await setting.snapshot()
        with pytest.raises(HubError, match=f"unknown upload {staged.upload_id}"):
            await thief.call("model.register", {
                "name": "stolen", "version": "1", "upload": staged.upload_id,
                "digest": staged.digest, "size": staged.size})
        after = await setting.snapshot()
        assert after == before
        assert await setting.upload_left(owner.key.keyid, staged.upload_id) > 0
        result = await owner.call("model.register", {
            "name": "owned", "version": "1", "upload": staged.upload_id,
            "digest": staged.digest, "size": staged.size})
        assert result["state"] == "registered"
        assert await setting.upload_left(owner.key.keyid, staged.upload_id) == 0


async def test_a_command_refused_before_reading_still_purges_its_upload(
    setting: Setting
) -> None:
    model = setting.fleet.root / "kws-1.tflite"
    async with await setting.client("registrant") as client:
        staged = await client.upload(model)
        with pytest.raises(HubError, match="kws/1 is already registered"):
            await client.call("model.register", {
                "name": "kws", "version": "1", "upload": staged.upload_id,
                "digest": staged.digest, "size": staged.size})
        assert await setting.left_after_purge(client.key.keyid, staged.upload_id) == 0


async def test_the_same_digest_uploaded_twice_registers_twice(setting: Setting) -> None:
    model = setting.fleet.root / "kws-1.tflite"
    async with await setting.client("registrant") as client:
        first = await client.register_model(model, "twice", "1")
        second = await client.register_model(model, "twice", "2")
    assert first["digest"] == second["digest"] == setting.released


# ---------------------------------------------------------------- releases bucket


async def test_the_reconciler_restores_a_released_blob_missing_from_releases(
    setting: Setting
) -> None:
    hub = setting.fleet.hub
    releases = await setting.js.object_store(RELEASES_BUCKET)
    await releases.delete(setting.released)
    result = await hub.reconciler.round()
    assert result.blobs == [setting.released]
    info = await releases.get_info(setting.released)
    assert not info.deleted
    # Copying again is a no-op (release retried, later rounds).
    assert not await copy_blob(setting.js, MODELS_BUCKET, RELEASES_BUCKET, setting.released,
                               int(info.size or 0))
    assert (await hub.reconciler.round()).blobs == []


async def test_a_real_agent_installs_the_released_model_from_releases(setting: Setting) -> None:
    """The happy path end to end: register -> validate -> approve -> release (the
    fixture) -> deploy -> a real agent, whose NATS user can read no other bucket,
    installs kws/1 from `releases`."""
    fleet = setting.fleet
    agent = fleet.agent(DEVICE).start()
    async with await setting.client("admin") as admin:
        await deploy_and_wait(fleet, admin, "1", [DEVICE])
    active = SlotStore(agent.state_dir).active()
    assert active is not None
    assert blake3.blake3(active.path.read_bytes()).hexdigest() == setting.released
