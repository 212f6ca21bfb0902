"""The hub's NATS edge: its connection, the JetStream layout, the operator API on
`hub.api.<verb>`, and the side effects handlers ask for (hub.commands.outcome.Effects):
blob reads, manifest / assignment / root writes in KV, the NATS users file."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    StreamConfig,
    StreamConsumerLimits,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from sqlalchemy import Engine

from edge_agent import protocol as proto
from edge_agent.protocol.names import (
    API_PREFIX,
    ASSIGNMENTS_BUCKET,
    ENROL_SUBJECT,
    LEDGER_CHECKPOINT_SUBJECT,
    LEDGER_ENTRY_SUBJECT,
    LEDGER_STREAM,
    MANIFESTS_BUCKET,
    MODELS_BUCKET,
    RELEASES_BUCKET,
    REPORTS_STREAM,
)
from edge_agent.transport.connect import connect_retrying
from edge_agent.transport.objects import iter_object_chunks
from hub.commands.envelope import claimed_actor
from hub.commands.router import Router
from hub.errors import Refused, Unreachable
from hub.home.config import HubConfig
from hub.home.nats_users import NatsUsersSync
from hub.home.replies import HUB_INBOX_PREFIX, ReplyGuard
from hub.keys.roots import put_root
from hub.uploads import UploadIntake, copy_blob, store_blob, uploads_stream
from ledger.encoding import canonical_encode
from ledger.retry import Stopped, describe, failure_reason

log = logging.getLogger("hub")
API_QUEUE = "hub"  # the queue group of every hub process's `hub.api.*` subscription
CONNECT_FOR_S = 10.0  # how long `start` tries to reach NATS by default (`hub serve --wait-nats`)

MAX_REQUEST_BYTES = 256 * 1024
# Commands handled at once. Writes still commit one at a time (the write lock); this
# lets reads and short writes answer while a slow one (validation) runs. Past it, the
# subscription waits, and NATS holds the requests.
MAX_CONCURRENT_REQUESTS = 16
# Gives back the API slot of the request the current task answers (serve_api).
_API_SLOT: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "api_slot", default=None)
# Every device holds a watch consumer on the assignments and trust-root buckets, plus one
# per model download; nats-server (2.11+) caps a stream at 1,000 consumers unless the
# stream says otherwise (err 10026 "maximum consumers limit reached").
FLEET_MAX_CONSUMERS = 1_000_000
# The longest a consumer on a device-readable stream outlives its last use (the
# stream's consumer_limits; nats-server applies it to durables too, and refuses a longer
# threshold, err 10153): a device may not delete consumers, so what it creates expires.
# At least the agent's own thresholds (assignment watch 120 s, download 30 s).
FLEET_CONSUMER_INACTIVE_S = 300.0


class NatsEdge:
    """The hub's one NATS connection and what goes through it (implements Effects)."""

    def __init__(self, config: HubConfig, engine: Engine) -> None:
        self.config = config
        self.nats_users = NatsUsersSync(config, engine)
        self.nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._api_slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._api_tasks: set[asyncio.Task[None]] = set()
        # Every responder of this hub checks its reply subject here (hub/home/replies.py).
        self.replies = ReplyGuard()
        # Operator uploads staged in UPLOADS (hub/uploads.py); counts refusals by reason.
        self.uploads = UploadIntake()
        self._api_tasks_aside: set[asyncio.Task[None]] = set()  # upload purges under way

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "NatsEdge.connect() was not called"
        return self._js

    async def connect(self, stop: asyncio.Event | None = None,
                      give_up_after: float | None = CONNECT_FOR_S) -> None:
        """Connect for good, retrying quietly (one log line per failed attempt with its
        reason) for `give_up_after` seconds (then the last error), or until `stop` is
        set (ledger.retry.Stopped)."""
        # The hub's own inboxes live under a root no other identity may subscribe to and
        # no responder of the hub answers under (hub/home/replies.py).
        auth = replace(self.config.nats_auth("hub"), inbox_prefix=HUB_INBOX_PREFIX)
        try:
            self.nc = await connect_retrying(
                self.config.nats_url, auth, name="hub", log=log, stop=stop,
                give_up_after=give_up_after)
        except Stopped:
            raise
        except Exception as exc:
            tried = "" if give_up_after is None else f"; tried for {give_up_after:g} s"
            raise Unreachable(
                f"cannot reach NATS at {self.config.nats_url} ({failure_reason(exc)}: "
                f"{describe(exc)}{tried}; is nats-server running with this hub's "
                "configuration?)") from exc
        self._js = self.nc.jetstream()

    async def ensure_layout(self) -> None:
        js = self.js
        replicas = self.config.nats_replicas
        # `models`: every blob the hub accepted (only the hub reads it); `releases`: the
        # released model blobs, the one bucket devices may read.
        for bucket in (MODELS_BUCKET, RELEASES_BUCKET):
            try:
                await js.object_store(bucket)
                await ensure_replicas(js, f"OBJ_{bucket}", replicas)
            except (BucketNotFoundError, NotFoundError):
                await js.create_object_store(bucket, config=ObjectStoreConfig(
                    replicas=replicas))
        for bucket in (MANIFESTS_BUCKET, ASSIGNMENTS_BUCKET):
            await ensure_kv(js, bucket, replicas)
        names = [f"OBJ_{MODELS_BUCKET}", f"OBJ_{RELEASES_BUCKET}", f"KV_{MANIFESTS_BUCKET}",
                 f"KV_{ASSIGNMENTS_BUCKET}"]
        for wanted in stream_configs(self.config):
            await ensure_stream(js, wanted)
            names.append(str(wanted.name))
        if replicas > 1:
            await wait_for_leaders(js, names)

    # ------------------------------------------------------------ the operator API

    async def serve_api(self, router: Router) -> None:
        assert self.nc is not None, "NatsEdge.connect() was not called"

        async def on_request(msg: Msg) -> None:
            # Where the answer goes is checked before anything runs: a command whose reply
            # subject the hub may not write to (a JetStream API subject, a KV key, a stream
            # subject, another operator's inbox) is dropped, not run (a confused deputy).
            if msg.reply and not self.replies.operator_reply(
                    msg.reply, claimed_actor(msg.data), msg.subject):
                return
            # nats-py runs one subscription's callbacks one after another: hand each
            # request to a task of its own so a long command does not hold up the next.
            await self._api_slots.acquire()
            released = False

            def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    self._api_slots.release()

            task = asyncio.create_task(self._answer(router, msg, release),
                                       name=f"api {msg.subject}")
            self._api_tasks.add(task)

            def done(t: asyncio.Task[None]) -> None:
                self._api_tasks.discard(t)
                release()

            task.add_done_callback(done)

        # A queue group: with several hub processes each command is answered (and
        # appended) by one of them, not by all.
        await self.nc.subscribe(API_PREFIX + ">", queue=API_QUEUE, cb=on_request)

    async def _answer(self, router: Router, msg: Msg, release: Callable[[], None]) -> None:
        _API_SLOT.set(release)  # this task's own context: see sync_nats_users
        verb = msg.subject[len(API_PREFIX):]
        try:
            if len(msg.data) > MAX_REQUEST_BYTES:
                raise Refused(f"request is over {MAX_REQUEST_BYTES} bytes")
            reply: dict[str, Any] = {"ok": True, "result": await router.handle(verb, msg.data)}
        except (Refused, proto.ProtocolError) as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # keep serving; the operator gets one line
            log.exception("command %s failed", verb)
            reply = {"ok": False, "error": f"internal error in {verb}: {exc}"}
        if msg.reply and self.nc is not None:
            # Checked on arrival (serve_api). Not msg.respond(): that would echo the
            # request's headers (Nats-Msg-Id, KV-Operation, ...) chosen by the requester.
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, canonical_encode(reply))

    async def serve_enrolment(
        self, handle: Callable[[bytes], Awaitable[dict[str, Any]]]
    ) -> None:
        """Answer enrolment requests of devices that made their own key
        (hub.devices.tokens), one at a time (enrolments are rare; a flood waits in line
        instead of taking the hub's API slots), only under `_INBOX_ENROL.`."""
        assert self.nc is not None, "NatsEdge.connect() was not called"

        async def on_request(msg: Msg) -> None:
            if not msg.reply or not self.replies.enrol_reply(msg.reply, ENROL_SUBJECT):
                return
            try:
                reply = await handle(msg.data)
            except Exception as exc:  # keep serving; the device gets one line
                log.exception("enrolment request failed")
                reply = {"ok": False, "error": f"internal error in enrolment: {exc}"}
            if self.nc is not None:
                with contextlib.suppress(Exception):
                    await self.nc.publish(msg.reply, canonical_encode(reply))

        await self.nc.subscribe(ENROL_SUBJECT, cb=on_request)

    async def drain_api(self, timeout: float = 10) -> None:
        """Let commands in progress answer (bounded), then cancel what is left."""
        if self._api_tasks:
            await asyncio.wait(set(self._api_tasks), timeout=timeout)
        for task in set(self._api_tasks):
            task.cancel()

    # ------------------------------------------------------------ Effects

    async def read_blob(self, digest: str, size: int, dest: Path) -> str:
        hasher = blake3.blake3()
        with open(dest, "wb") as fh:
            assert self.nc is not None
            async for chunk in iter_object_chunks(self.nc, MODELS_BUCKET, digest, size):
                hasher.update(chunk)
                fh.write(chunk)
        return hasher.hexdigest()

    async def put_blob(self, digest: str, data: bytes) -> None:
        """Store `data` in the Object Store under `digest` (its BLAKE3, the caller's)."""
        await (await self.js.object_store(MODELS_BUCKET)).put(digest, data)

    async def take_upload(self, keyid: str, upload_id: str, digest: str, size: int,
                          max_bytes: int, dest: Path, what: str) -> None:
        """An operator's staged upload into `dest`, checked, then purged (hub.uploads)."""
        await self.uploads.take(self.js, keyid, upload_id, digest, size, max_bytes, dest,
                                what)

    def discard_upload(self, keyid: str, upload_id: str) -> None:
        """Purge an upload whose command was refused before it was read (in the
        background: the refusal does not wait for it)."""
        task = asyncio.create_task(self.uploads.discard(self.js, keyid, upload_id))
        self._api_tasks_aside.add(task)
        task.add_done_callback(self._api_tasks_aside.discard)

    async def store_blob(self, digest: str, path: Path) -> None:
        """Store a checked file in `models` under its digest (idempotent)."""
        await store_blob(self.js, MODELS_BUCKET, digest, path)

    async def release_blob(self, digest: str, size: int) -> None:
        """Copy a blob from `models` into `releases`, where devices read it (nothing if
        it is there already)."""
        await copy_blob(self.js, MODELS_BUCKET, RELEASES_BUCKET, digest, size)

    async def put_manifest(self, key: str, envelope: bytes) -> None:
        await (await self.js.key_value(MANIFESTS_BUCKET)).put(key, envelope)

    async def put_assignment(self, device: str, envelope: bytes) -> None:
        await (await self.js.key_value(ASSIGNMENTS_BUCKET)).put(device, envelope)

    async def publish_root(self, data: bytes) -> None:
        await put_root(self.js, data)

    async def sync_nats_users(self, wait: bool = True) -> bool:
        """Rewrite the NATS users file from the device table and reload the local server;
        without `wait` only schedule it (returns False)."""
        if not wait:
            self.nats_users.request()
            return False
        # A command that only waits for the reload (an enrolment, after its commit)
        # gives its API slot back: the next commands commit meanwhile and share the next
        # reload. Held, 16 enrolments shared one reload, and a reload of a users file
        # of 10,000 devices takes seconds (O(n^2) for a fleet's enrolment).
        release = _API_SLOT.get()
        if release is not None:
            release()
        return await self.nats_users.sync()

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        """Publish without waiting for an ack (the ledger feed)."""
        assert self.nc is not None
        await self.nc.publish(subject, data, headers=headers)

    async def close(self) -> None:
        await self.nats_users.close()
        if self.nc is not None and not self.nc.is_closed:
            # Handlers are done by now; flush what we published and close.
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)


DAY_S = 86400.0
# What ensure_stream sets on a stream that exists already (an older hub's, without them;
# num_replicas: a home that moved from one server to a cluster, or back).
LIMIT_FIELDS = ("max_age", "max_bytes", "max_msgs_per_subject", "discard", "max_msg_size",
                "num_replicas")


LEADER_WAIT_S = 30.0


async def wait_for_leaders(js: JetStreamContext, streams: list[str],
                           timeout: float = LEADER_WAIT_S) -> None:
    """Until each replicated stream has elected its leader: a stream created (or scaled)
    a moment ago answers its first reads with "no responders" until then, which would
    fail the first command that reads it (an upload, a download)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for stream in streams:
        while True:
            with contextlib.suppress(Exception):
                info = await js.stream_info(stream)
                if info.cluster is None or info.cluster.leader:
                    break
            if loop.time() > deadline:
                log.warning("stream %s has no leader yet after %g s", stream, timeout)
                return
            await asyncio.sleep(0.1)


async def ensure_kv(js: JetStreamContext, bucket: str, replicas: int) -> None:
    """A KV bucket (history 1) at `replicas`, made or brought to it in place."""
    try:
        await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        # direct=True: devices read it with direct gets only (allow_fleet_consumers)
        await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, direct=True,
                                                 replicas=replicas))
        return
    await ensure_replicas(js, f"KV_{bucket}", replicas)


async def ensure_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Scale an existing stream (a bucket's too) to `replicas` in place: nats-server
    moves its data to the new peers and keeps it, messages and consumers alike. A
    server that cannot (fewer nodes than replicas) refuses: logged, the hub runs on."""
    info = await js.stream_info(stream)
    if info.config.num_replicas == replicas:
        return
    info.config.num_replicas = replicas
    try:
        await js.update_stream(info.config)
    except Exception as exc:
        log.warning("cannot set %d replicas on stream %s: %s", replicas, stream, exc)
        return
    log.info("stream %s now has %d replicas", stream, replicas)


def stream_configs(config: HubConfig) -> list[StreamConfig]:
    """The hub's streams, with their retention limits (docs/PROTOCOL.md "Retention").
    UPLOADS is the operators' staging area (hub.uploads.uploads_stream). All discard
    their oldest messages at a limit: REPORTS is an inbox the hub empties
    (a report older than the limit, unread because the hub was down that long, is lost;
    a device flood cannot fill the server's disk), LEDGER a feed whose record is the
    ledger itself (readers catch up through the ledger API)."""
    return [
        StreamConfig(
            name=REPORTS_STREAM,
            subjects=["fleet.report.>"],
            duplicate_window=600.0,
            max_msg_size=proto.MAX_ENVELOPE_BYTES,
            max_age=config.reports_max_age_days * DAY_S,
            max_bytes=config.reports_max_bytes,
            max_msgs_per_subject=config.reports_max_msgs_per_subject,
            discard=DiscardPolicy.OLD,
            num_replicas=config.nats_replicas,
        ),
        StreamConfig(
            name=LEDGER_STREAM,
            subjects=[LEDGER_ENTRY_SUBJECT, LEDGER_CHECKPOINT_SUBJECT],
            max_age=config.ledger_feed_max_age_days * DAY_S,
            max_bytes=config.ledger_feed_max_bytes,
            discard=DiscardPolicy.OLD,
            num_replicas=config.nats_replicas,
        ),
        replace(uploads_stream(config.uploads_max_bytes, config.uploads_max_age_seconds),
                num_replicas=config.nats_replicas),
    ]


async def ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> bool:
    """Create the stream, or bring an existing one's limits to `wanted` in place (a
    stream update keeps its messages and consumers). True when something changed."""
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        await js.add_stream(wanted)
        return True
    config = info.config
    stale = [f for f in LIMIT_FIELDS
             if getattr(wanted, f) is not None and getattr(config, f) != getattr(wanted, f)]
    if not stale:
        return False
    for field in stale:
        setattr(config, field, getattr(wanted, field))
    await js.update_stream(config)
    log.info("stream %s updated: %s", wanted.name, ", ".join(stale))
    return True


async def allow_fleet_consumers(js: JetStreamContext, replicas: int | None = None) -> None:
    """On the buckets every device reads: allow direct gets (the only way a device reads
    them: it runs no JetStream call in the hub's account, docs/PROTOCOL.md
    "Permissions"; a bucket an older hub made has none), raise max_consumers, and cap
    the inactive threshold of consumers (idempotent; devices make none any more, the
    caps stay as a second line); with `replicas`, also scale them to it."""
    from edge_agent.protocol.names import ROOTS_BUCKET, TRANSPARENCY_BUCKET

    buckets = (f"KV_{ASSIGNMENTS_BUCKET}", f"KV_{MANIFESTS_BUCKET}", f"KV_{ROOTS_BUCKET}",
               f"KV_{TRANSPARENCY_BUCKET}", f"OBJ_{RELEASES_BUCKET}")
    for stream in buckets:
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            continue  # not made yet (transparency: at the first witnessed release)
        except Exception as exc:
            log.warning("cannot read stream %s: %s", stream, exc)
            continue
        limits = info.config.consumer_limits
        if (info.config.max_consumers == FLEET_MAX_CONSUMERS and limits is not None
                and limits.inactive_threshold == FLEET_CONSUMER_INACTIVE_S
                and info.config.allow_direct
                and replicas in (None, info.config.num_replicas)):
            continue
        info.config.allow_direct = True
        info.config.max_consumers = FLEET_MAX_CONSUMERS
        if replicas is not None:
            info.config.num_replicas = replicas
        info.config.consumer_limits = StreamConsumerLimits(
            inactive_threshold=FLEET_CONSUMER_INACTIVE_S,
            max_ack_pending=None if limits is None else limits.max_ack_pending)
        try:
            await js.update_stream(info.config)
        except Exception as exc:  # a server that refuses: devices beyond 1,000 may not watch
            log.warning("cannot set the consumer limits of %s: %s", stream, exc)
