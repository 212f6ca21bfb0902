"""Class 2 of issue 12, closed: no identity but the hub runs a JetStream call in the
account that owns the hub's streams (docs/PROTOCOL.md "Permissions").

A real nats-server with the configuration `hub init` writes and a real hub. From a stolen
device bundle, an operator's key and the witness password, every JetStream API verb
(STREAM.INFO/PURGE/DELETE/UPDATE/CREATE/MSG.DELETE/MSG.GET, CONSUMER.CREATE with a
deliver subject inside the hub's subjects, DURABLE.CREATE, DIRECT.GET), under `$JS.API.`
and under the operators' import prefix, on every stream, with the reply subject aimed at
KV keys, object metadata, report subjects, the ledger feed and `$JS.API.STREAM.PURGE.*`
(and at the subjects each identity imports as services, where a response would be
carried on into the hub's account if the server did that). Each attack failed (the
server refused the publish, or answered it in the attacker's own account) AND nothing
changed in the hub's account: stream message counts, first and last sequences, consumer
lists, KV values, object metadata, the ledger head.

Twice: as `hub init` configures it, and with every non-hub user's subject permissions
replaced by "everything" (publish and subscribe `>`), to show that the account boundary
alone holds; the permissions are the second line.

The forged hint a device can still send inside the devices' account:
tests/security/test_forged_hint.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from edge_agent.protocol.names import (
    ASSIGNMENTS_BUCKET,
    LEDGER_CHECKPOINT_SUBJECT,
    LEDGER_ENTRY_SUBJECT,
    LEDGER_STREAM,
    MANIFESTS_BUCKET,
    MODELS_BUCKET,
    RELEASES_BUCKET,
    REPORTS_STREAM,
    ROOT_LATEST_KEY,
    ROOTS_BUCKET,
    UPLOADS_STREAM,
)
from edge_agent.transport.connect import NatsAuth
from hub.commands.envelope import sign_command
from hub.home import nats_config
from hub.home.config import init_home, set_nats_url
from hub.home.nats_config import server_conf_path
from ledger.encoding import canonical_encode
from ledger.signing import SigningKey
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet
from tests.test_nats_permissions import Conn

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

WAIT = 10.0
SETTLE = 2.0  # how long the hub's account is watched for a late change after an attack
# OBJ: the bucket devices read (released blobs); MODELS: the hub's own (validation sets,
# unreleased models); UPLOADS: the operators' staging stream.
ASG, ROOTS, MANI, OBJ, MODELS = (f"KV_{ASSIGNMENTS_BUCKET}", f"KV_{ROOTS_BUCKET}",
                                 f"KV_{MANIFESTS_BUCKET}", f"OBJ_{RELEASES_BUCKET}",
                                 f"OBJ_{MODELS_BUCKET}")
STREAMS = (ASG, ROOTS, MANI, OBJ, MODELS, UPLOADS_STREAM, REPORTS_STREAM, LEDGER_STREAM)
MANIFEST_KEY = "kws.1"
BLOB = b"a released model\n" * 64
BLOB_NAME = "e" * 64
BLOB_META = f"$O.{RELEASES_BUCKET}.M." + base64.urlsafe_b64encode(BLOB_NAME.encode()).decode()

# Where an attacker aims the server's answer (or a push consumer's deliveries).
TARGETS = [
    f"$KV.{ASSIGNMENTS_BUCKET}.dev-b", f"$KV.{ROOTS_BUCKET}.{ROOT_LATEST_KEY}",
    f"$KV.{MANIFESTS_BUCKET}.{MANIFEST_KEY}", BLOB_META, f"$O.{RELEASES_BUCKET}.C.forged",
    "fleet.report.dev-b.status", "fleet.report.dev-a.status",
    LEDGER_ENTRY_SUBJECT, LEDGER_CHECKPOINT_SUBJECT,
    f"$JS.API.STREAM.PURGE.{ASG}", f"$JS.API.STREAM.PURGE.{OBJ}",
    f"$JS.API.STREAM.PURGE.{MODELS}", f"$JS.API.STREAM.PURGE.{UPLOADS_STREAM}",
    "hub.api.device.enroll", "ledger.cosignature",
]


async def put_blobs(fleet: Fleet) -> None:
    """The blob in the hub's `models` bucket and, released, in `releases`."""
    await fleet.hub.edge.put_blob(BLOB_NAME, BLOB)
    await (await fleet.hub.edge.js.object_store(RELEASES_BUCKET)).put(BLOB_NAME, BLOB)


def api_requests(prefix: str) -> list[tuple[str, bytes]]:
    """(subject, body) of every JetStream API verb on every stream, under `prefix`."""
    out: list[tuple[str, bytes]] = []
    for stream in STREAMS:
        out += [
            (f"{prefix}.STREAM.INFO.{stream}", b""),
            (f"{prefix}.STREAM.PURGE.{stream}", b""),
            (f"{prefix}.STREAM.DELETE.{stream}", b""),
            (f"{prefix}.STREAM.UPDATE.{stream}",
             json.dumps({"name": stream, "subjects": ["evil.>"]}).encode()),
            (f"{prefix}.STREAM.MSG.DELETE.{stream}", json.dumps({"seq": 1}).encode()),
            (f"{prefix}.STREAM.MSG.GET.{stream}", json.dumps({"seq": 1}).encode()),
            (f"{prefix}.DIRECT.GET.{stream}", json.dumps({"seq": 1}).encode()),
            (f"{prefix}.DIRECT.GET.{stream}.$KV.{ASSIGNMENTS_BUCKET}.dev-b", b""),
            (f"{prefix}.CONSUMER.DURABLE.CREATE.{stream}.evil",
             json.dumps({"stream_name": stream, "config": {
                 "durable_name": "evil", "deliver_subject": LEDGER_ENTRY_SUBJECT,
                 "ack_policy": "none", "deliver_policy": "all"}}).encode()),
        ]
        for deliver in (LEDGER_ENTRY_SUBJECT, f"$KV.{ASSIGNMENTS_BUCKET}.dev-b", BLOB_META,
                        "fleet.report.dev-b.status"):
            config = {"deliver_subject": deliver, "ack_policy": "none", "deliver_policy": "all"}
            out.append((f"{prefix}.CONSUMER.CREATE.{stream}",
                        json.dumps({"stream_name": stream, "config": config}).encode()))
            out.append((f"{prefix}.CONSUMER.CREATE.{stream}.evil.>",
                        json.dumps({"stream_name": stream,
                                    "config": {**config, "name": "evil"}}).encode()))
    out.append((f"{prefix}.STREAM.CREATE.EVIL", json.dumps(
        {"name": "EVIL", "subjects": [f"$KV.{ASSIGNMENTS_BUCKET}.>"]}).encode()))
    return out


# No account imports a JetStream API subject but the devices' direct gets: operators
# upload with plain publishes to their own `upload.<keyid>.>` (issue 12 class 3).
ALL_REQUESTS = api_requests("$JS.API")


def requests_of(identity: str) -> list[tuple[str, bytes]]:
    return list(ALL_REQUESTS)


def targets_of(identity: str) -> list[str]:
    return list(TARGETS)


def allowed(subject: str, patterns: list[str]) -> bool:
    """NATS subject matching: `subject` is in one of `patterns` (`*`, `>`)."""
    tokens = subject.split(".")
    for pattern in patterns:
        parts = pattern.split(".")
        for i, part in enumerate(parts):
            if part == ">":
                if len(tokens) > i:
                    return True
                break
            if i >= len(tokens) or (part != "*" and part != tokens[i]):
                break
        else:
            if len(parts) == len(tokens):
                return True
    return False


# ---------------------------------------------------------------- the setting


@dataclass
class Setting:
    fleet: Fleet
    js: JetStreamContext  # the hub's own
    conns: dict[str, Conn]
    publish: dict[str, list[str]]  # each identity's publish permissions
    seen: dict[str, list[Msg]] = field(default_factory=dict)  # stripped: all it receives

    async def snapshot(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for stream in STREAMS:
            info = await self.js.stream_info(stream)
            names = sorted(c.name for c in await self.js.consumers_info(stream))
            state[stream] = (info.state.messages, info.state.first_seq, info.state.last_seq,
                             names, info.config.subjects)
        state["streams"] = sorted(await self.js.streams_info(), key=lambda s: s.config.name)
        state["streams"] = [s.config.name for s in state["streams"]]
        for bucket, key in ((ASSIGNMENTS_BUCKET, "dev-a"), (ASSIGNMENTS_BUCKET, "dev-b"),
                            (MANIFESTS_BUCKET, MANIFEST_KEY), (ROOTS_BUCKET, ROOT_LATEST_KEY)):
            try:
                entry = await (await self.js.key_value(bucket)).get(key)
                state[f"{bucket}/{key}"] = (entry.revision, entry.value)
            except KeyNotFoundError:
                state[f"{bucket}/{key}"] = None
        try:
            meta = await (await self.js.object_store(MODELS_BUCKET)).get_info(BLOB_NAME)
            state["blob"] = (meta.nuid, meta.size, meta.digest, meta.deleted)
        except NotFoundError:
            state["blob"] = None
        store = self.fleet.hub.store
        head = store.head()
        state["ledger"] = (store.count(), None if head is None else head.hash)
        return state


EVERYTHING = {"publish": [">"], "subscribe": [">"]}


async def make_setting(root: Path, stripped: bool) -> tuple[Setting, EmbeddedNats]:
    config = init_home(root / "hub", "nats://127.0.0.1:4222")
    server = EmbeddedNats(store_dir=root / "nats",
                          config_file=server_conf_path(config.home)).start()
    set_nats_url(config.home, server.url)
    fleet = await Fleet(root, server.url).start()
    async with await fleet.client() as admin:
        for device in ("dev-a", "dev-b"):
            await admin.call("device.enroll", {"device": device})
    js = fleet.hub.edge.js
    await (await js.key_value(ASSIGNMENTS_BUCKET)).put("dev-a", b"assignment of dev-a")
    await (await js.key_value(ASSIGNMENTS_BUCKET)).put("dev-b", b"assignment of dev-b")
    await (await js.key_value(MANIFESTS_BUCKET)).put(MANIFEST_KEY, b"manifest")
    await put_blobs(fleet)
    await js.publish("fleet.report.dev-b.telemetry", b"a report")
    assert fleet.hub.ledger_publishing is not None
    await fleet.hub.ledger_publishing.checkpointer.sign_now()
    device_key = SigningKey.load(fleet.bundle("dev-a") / "device.key")
    auths = {"device": NatsAuth.for_device("dev-a", device_key.private_raw()),
             "operator": config.operator_auth(fleet.admin_key),
             "witness": config.nats_auth("witness")}
    conns = {name: await Conn.open(server.url, auth, name) for name, auth in auths.items()}
    publish = {
        "device": nats_config.device_permissions("dev-a")["publish"],
        "operator": nats_config.operator_permissions(fleet.admin_key.keyid)["publish"],
        "witness": nats_config.WITNESS_PERMISSIONS["publish"],
    }
    if stripped:
        publish = {name: [">"] for name in publish}
    setting = Setting(fleet, js, conns, publish)
    if stripped:
        for name, conn in conns.items():
            setting.seen[name] = []

            async def keep(msg: Msg, into: list[Msg] = setting.seen[name]) -> None:
                into.append(msg)

            await conn.nc.subscribe(">", cb=keep)
            await conn.nc.flush()
    return setting, server


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["as-configured",
                                                                    "permissions-stripped"])
async def setting(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setting]:
    stripped = request.param == "permissions-stripped"
    patch = pytest.MonkeyPatch()
    if stripped:  # the hub writes users.conf with these (hub.home.nats_config.write_users)
        patch.setattr(nats_config, "device_permissions", lambda device: EVERYTHING)
        patch.setattr(nats_config, "operator_permissions", lambda keyid: EVERYTHING)
        patch.setattr(nats_config, "WITNESS_PERMISSIONS", EVERYTHING)
    server: EmbeddedNats | None = None
    made: Setting | None = None
    try:
        made, server = await make_setting(tmp_path_factory.mktemp(request.param), stripped)
        yield made
    finally:
        patch.undo()
        if made is not None:
            for conn in made.conns.values():
                await conn.close()
            await made.fleet.stop()
        if server is not None:
            server.close()


async def unchanged_for(read: Callable[[], Awaitable[object]], before: object,
                        seconds: float) -> None:
    """`read()` still gives `before` throughout `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        assert await read() == before
        if loop.time() > deadline:
            return
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------- the attacks


@pytest.mark.parametrize("identity", ["device", "operator", "witness"])
async def test_no_jetstream_call_changes_the_hubs_account(setting: Setting,
                                                          identity: str) -> None:
    conn = setting.conns[identity]
    before = await setting.snapshot()
    errors_before = len(conn.errors)
    sent = 0
    requests = requests_of(identity)
    for subject, body in requests:
        for target in targets_of(identity):
            await conn.nc.publish(subject, body, reply=target)
            sent += 1
    await conn.nc.flush(timeout=WAIT)
    # Each publish the server let through was answered in the attacker's own account,
    # or not at all; none reached the hub's.
    await unchanged_for(setting.snapshot, before, SETTLE)
    assert setting.fleet.hub.store.verify().ok
    # Each publish the identity's permissions forbid was refused by the server (nats-py
    # lower-cases its error text; the server names the subject).
    violations = " ".join(conn.errors[errors_before:]).lower()
    for subject, _ in requests:
        if not allowed(subject, setting.publish[identity]):
            assert subject.lower() in violations, f"{identity} may publish to {subject}"
    if setting.seen:  # stripped: the server answered JetStream calls itself, locally
        answers = [m for m in setting.seen[identity] if m.subject in TARGETS]
        assert any(b"JetStream not enabled for account" in m.data for m in answers), \
            [m.data[:80] for m in answers[:5]]
    assert sent == len(requests) * len(targets_of(identity))


@pytest.mark.parametrize("identity", ["device", "operator", "witness"])
async def test_a_service_answer_aimed_at_the_hubs_subjects_stays_with_the_requester(
        setting: Setting, identity: str) -> None:
    """The services each identity may call, with every reply target: the answer is
    delivered in the requester's account, never carried into the hub's."""
    conn = setting.conns[identity]
    keyid = setting.fleet.admin_key.keyid
    calls: dict[str, list[tuple[str, bytes]]] = {
        "device": [(f"$JS.API.DIRECT.GET.{ASG}.$KV.{ASSIGNMENTS_BUCKET}.dev-a", b""),
                   (f"$JS.API.DIRECT.GET.{ROOTS}.$KV.{ROOTS_BUCKET}.{ROOT_LATEST_KEY}", b""),
                   (f"$JS.API.DIRECT.GET.{OBJ}", json.dumps({"seq": 1}).encode()),
                   (f"$JS.API.DIRECT.GET.{OBJ}.{BLOB_META}", b"")],
        "operator": [("hub.api.status", sign_command(
                          setting.fleet.admin_key, "status", {},
                          audience=setting.fleet.config.origin)),
                     ("ledger.api.checkpoint", canonical_encode({}))],
        "witness": [("ledger.api.checkpoint", canonical_encode({})),
                     ("ledger.api.entries", canonical_encode({"start": 0, "limit": 2}))],
    }
    assert keyid
    before = await setting.snapshot()
    for subject, body in calls[identity]:
        for target in targets_of(identity):
            await conn.nc.publish(subject, body, reply=target)
    await conn.nc.flush(timeout=WAIT)
    await unchanged_for(setting.snapshot, before, SETTLE)
    if setting.seen:  # the answers did arrive, at the targets, in its own account
        assert any(m.subject in TARGETS for m in setting.seen[identity])


@pytest.mark.parametrize("how", ["request", "reply-chain"])
async def test_an_operator_cannot_purge_the_models_bucket(setting: Setting, how: str) -> None:
    conn = setting.conns["operator"]
    await put_blobs(setting.fleet)  # again, if a case purged it
    before = await setting.snapshot()
    purge = f"$JS.API.STREAM.PURGE.{MODELS}"
    if how == "request":
        await conn.nc.publish(purge, b"", reply=conn.nc.new_inbox())
    else:  # the ledger API's answer, delivered at the purge import, is carried on
        await conn.nc.publish("ledger.api.checkpoint", canonical_encode({}), reply=purge)
    await conn.nc.flush(timeout=WAIT)
    await unchanged_for(setting.snapshot, before, SETTLE)
