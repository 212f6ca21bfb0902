"""`hub serve`: the NATS service and the only writer of the ledger.

It owns the JetStream layout (DESIGN.md "NATS layout"), answers operator
requests on `hub.api.<verb>`, and turns device reports into ledger events. Every
handler refuses bad input with a message and keeps serving; a command's events
and their projection updates commit in one transaction, and side effects that
devices act on (assignments in the KV bucket) are written only after the ledger
has them, so a device never runs something the ledger does not show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import blake3
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError

from edge_agent import protocol as proto
from edge_agent.fetch import BlobTooLarge, FetchError, iter_object_chunks
from edge_agent.runtime import ModelRuntimeError, describe
from ledger.encoding import canonical_encode
from ledger.entry import Entry
from ledger.store import LedgerStore, NewEvent

from . import events as ev
from . import projections as proj
from .home import HubConfig

log = logging.getLogger("hub")

MODELS_BUCKET = "models"
MANIFESTS_BUCKET = "manifests"
ASSIGNMENTS_BUCKET = "assignments"
REPORTS_STREAM = "REPORTS"
LEDGER_STREAM = "LEDGER"
API_PREFIX = "hub.api."
REPORTS_DURABLE = "hub-reports"
DAY_NS = 24 * 3600 * 10**9


class CommandError(Exception):
    """An operator command was refused; the message goes back to the operator."""


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class HubService:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.release_key = config.load_key("release")
        self.director_key = config.load_key("director")
        self.store = LedgerStore.open(config.database_url())
        with self.store.engine.begin() as conn:
            proj.create_tables(conn)
        self._write_lock = asyncio.Lock()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.refused_reports = 0
        self._handlers: dict[str, Handler] = {
            "status": self._api_status,
            "model.register": self._api_register,
            "models": self._api_models,
            "device.enroll": self._api_enroll,
            "devices": self._api_devices,
            "deploy": self._api_deploy,
        }

    # ------------------------------------------------------------ lifecycle

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "HubService.start() was not called"
        return self._js

    async def start(self) -> None:
        self._nc = await nats.connect(
            self.config.nats_url, name="hub", max_reconnect_attempts=-1, reconnect_time_wait=0.5
        )
        self._js = self._nc.jetstream()
        await self._ensure_layout()
        await self._nc.subscribe(API_PREFIX + ">", cb=self._on_api)
        self._tasks.append(asyncio.create_task(self._consume_reports(), name="reports"))
        log.info("hub serving on %s, ledger %s", self.config.nats_url, self.config.database_url())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._nc is not None and not self._nc.is_closed:
            # Handlers are done by now; flush what we published and close.
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            await self._nc.close()
        self.store.close()

    async def _ensure_layout(self) -> None:
        js = self.js
        try:
            await js.object_store(MODELS_BUCKET)
        except (BucketNotFoundError, NotFoundError):
            await js.create_object_store(MODELS_BUCKET, config=ObjectStoreConfig())
        for bucket in (MANIFESTS_BUCKET, ASSIGNMENTS_BUCKET):
            try:
                await js.key_value(bucket)
            except (BucketNotFoundError, NotFoundError):
                await js.create_key_value(KeyValueConfig(bucket=bucket, history=1))
        await js.add_stream(
            StreamConfig(
                name=REPORTS_STREAM,
                subjects=["fleet.report.>"],
                duplicate_window=600.0,
                max_msg_size=proto.MAX_ENVELOPE_BYTES,
            )
        )
        await js.add_stream(
            StreamConfig(name=LEDGER_STREAM, subjects=["ledger.entry", "ledger.checkpoint"])
        )

    # ------------------------------------------------------------ ledger writes

    async def _append(self, new: list[NewEvent]) -> list[Entry]:
        async with self._write_lock:
            entries = self.store.append_many(new, apply=proj.apply_entries)
        for entry in entries:
            with contextlib.suppress(Exception):  # the feed is a convenience; the DB is truth
                await self.js.publish("ledger.entry", entry.body, headers=_entry_headers(entry))
        return entries

    def _read(self) -> Any:
        return self.store.engine.connect()

    # ------------------------------------------------------------ operator API

    async def _on_api(self, msg: Msg) -> None:
        verb = msg.subject[len(API_PREFIX):]
        handler = self._handlers.get(verb)
        try:
            if handler is None:
                raise CommandError(f"unknown command {verb!r}; known: {', '.join(self._handlers)}")
            body = proto.decode_map(msg.data, f"{verb} request") if msg.data else {}
            result = await handler(body)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except (CommandError, proto.ProtocolError) as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # keep serving; the operator gets one line
            log.exception("command %s failed", verb)
            reply = {"ok": False, "error": f"internal error in {verb}: {exc}"}
        if msg.reply:
            await msg.respond(canonical_encode(_jsonable(reply)))

    async def _api_status(self, body: dict[str, Any]) -> Any:
        head = self.store.head()
        return {
            "entries": 0 if head is None else head.seq + 1,
            "head": "" if head is None else head.hash.hex(),
            "refused_reports": self.refused_reports,
        }

    async def _api_models(self, body: dict[str, Any]) -> Any:
        with self._read() as conn:
            return proj.list_releases(conn)

    async def _api_devices(self, body: dict[str, Any]) -> Any:
        with self._read() as conn:
            return proj.list_devices(conn)

    async def _api_enroll(self, body: dict[str, Any]) -> Any:
        device = _text(body, "device")
        try:
            proto.check_device_id(device)
        except proto.ProtocolError as exc:
            raise CommandError(str(exc)) from exc
        with self._read() as conn:
            if proj.get_device(conn, device) is not None:
                raise CommandError(f"device {device} is already enrolled")
        entries = await self._append(
            [NewEvent(ev.DEVICE_ENROLLED, ev.HUB_ACTOR, ev.device_subject(device),
                      {"device": device})]
        )
        return {"device": device, "seq": entries[0].seq}

    async def _api_register(self, body: dict[str, Any]) -> Any:
        name, version = _text(body, "name"), _text(body, "version")
        digest, size = _text(body, "digest"), _int(body, "size")
        try:
            proto.check_model_ref(name, version)
        except proto.ProtocolError as exc:
            raise CommandError(str(exc)) from exc
        with self._read() as conn:
            if proj.get_release(conn, name, version) is not None:
                raise CommandError(
                    f"model {name}/{version} is already registered; versions are immutable, "
                    "register a new version"
                )
        signature = await self._inspect_blob(digest, size)
        now = time.time_ns()
        manifest = proto.ReleaseManifest(
            name=name, version=version, digest=digest, size=size, format="tflite",
            inputs=signature["inputs"], outputs=signature["outputs"], created=now,
            expires=now + self.config.manifest_ttl_days * DAY_NS,
        )
        envelope = proto.SignedEnvelope.sign(
            manifest.to_map(), proto.DOMAIN_MANIFEST, [self.release_key]
        ).encode()
        manifest_hash = blake3.blake3(envelope).hexdigest()
        kv = await self.js.key_value(MANIFESTS_BUCKET)
        await kv.put(proto.manifest_key(name, version), envelope)
        subject = ev.model_subject(name, version)
        entries = await self._append([
            NewEvent(ev.MODEL_REGISTERED, ev.HUB_ACTOR, subject, {
                "name": name, "version": version, "digest": digest, "size": size,
                "format": "tflite", "inputs": signature["inputs"],
                "outputs": signature["outputs"],
            }),
            # The skeleton releases on registration; the approval gate comes in front later.
            NewEvent(ev.MODEL_RELEASED, ev.HUB_ACTOR, subject, {
                "name": name, "version": version, "digest": digest,
                "manifest_hash": manifest_hash, "manifest": envelope,
                "expires": manifest.expires,
            }),
        ])
        return {"name": name, "version": version, "digest": digest,
                "manifest_hash": manifest_hash, "seq": [e.seq for e in entries]}

    async def _inspect_blob(self, digest: str, size: int) -> dict[str, Any]:
        """Read the uploaded blob back, check its digest, and load it with TFLite."""
        hasher = blake3.blake3()
        fd, tmp = tempfile.mkstemp(suffix=".tflite")
        try:
            with os.fdopen(fd, "wb") as fh:
                try:
                    async for chunk in iter_object_chunks(self.js, MODELS_BUCKET, digest, size):
                        hasher.update(chunk)
                        fh.write(chunk)
                except (FetchError, BlobTooLarge) as exc:
                    raise CommandError(f"cannot read the uploaded model: {exc}") from exc
            if hasher.hexdigest() != digest:
                raise CommandError(
                    f"the object store blob does not match digest {digest}; upload it again"
                )
            try:
                return describe(Path(tmp))
            except ModelRuntimeError as exc:
                raise CommandError(f"not a loadable TFLite model: {exc}") from exc
        finally:
            os.unlink(tmp)

    async def _api_deploy(self, body: dict[str, Any]) -> Any:
        name, version = _text(body, "model"), _text(body, "version")
        wanted = body.get("devices", [])
        if not isinstance(wanted, list) or not all(isinstance(d, str) for d in wanted):
            raise CommandError("devices must be a list of device ids")
        all_devices = body.get("all") is True
        if not wanted and not all_devices:
            raise CommandError("name at least one --device, or use --all")
        with self._read() as conn:
            release = proj.get_release(conn, name, version)
            if release is None or release["state"] != "released":
                raise CommandError(f"model {name}/{version} is not released; see `hub models`")
            known = {d["device"]: d for d in proj.list_devices(conn)}
        targets = sorted(known) if all_devices else list(dict.fromkeys(wanted))
        unknown = [d for d in targets if d not in known]
        if unknown:
            raise CommandError(f"unknown device(s): {', '.join(unknown)}; enroll them first")
        if not targets:
            raise CommandError("no devices are enrolled")
        head = self.store.head()
        deployment = f"dep-{0 if head is None else head.seq + 1}"
        now = time.time_ns()
        new = [NewEvent(ev.DEPLOYMENT_CREATED, ev.HUB_ACTOR, ev.deployment_subject(deployment),
                        {"deployment": deployment, "model": name, "version": version,
                         "devices": targets})]
        envelopes: dict[str, bytes] = {}
        for device in targets:
            counter = int(known[device]["counter"]) + 1
            assignment = proto.Assignment(
                device=device, model=name, version=version, digest=release["digest"],
                manifest_hash=release["manifest_hash"], counter=counter, rollout=deployment,
                issued_at=now, expires=now + self.config.assignment_ttl_days * DAY_NS,
            )
            envelope = proto.SignedEnvelope.sign(
                assignment.to_map(), proto.DOMAIN_ASSIGNMENT, [self.director_key]
            ).encode()
            envelopes[device] = envelope
            new.append(NewEvent(ev.DEVICE_ASSIGNED, ev.HUB_ACTOR, ev.device_subject(device), {
                "device": device, "deployment": deployment, "model": name, "version": version,
                "digest": release["digest"], "counter": counter,
                "manifest_hash": release["manifest_hash"], "assignment": envelope,
            }))
        await self._append(new)
        kv = await self.js.key_value(ASSIGNMENTS_BUCKET)
        for device, envelope in envelopes.items():
            await kv.put(device, envelope)
        return {"deployment": deployment, "devices": targets}

    # ------------------------------------------------------------ device reports

    async def _consume_reports(self) -> None:
        sub = await self.js.pull_subscribe(
            "fleet.report.>", durable=REPORTS_DURABLE, stream=REPORTS_STREAM
        )
        while True:
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except TimeoutError:
                continue
            except Exception as exc:  # disconnected: nats-py reconnects; try again shortly
                log.warning("report fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                try:
                    await self._handle_report(msg.subject, msg.data)
                except proto.ProtocolError as exc:
                    self.refused_reports += 1
                    log.warning("refused report on %s: %s", msg.subject, exc)
                with contextlib.suppress(Exception):
                    await msg.ack()

    async def _handle_report(self, subject: str, data: bytes) -> None:
        parts = subject.split(".")
        if len(parts) != 4:
            raise proto.ProtocolError(f"unexpected report subject {subject}")
        report = proto.decode_report(data)
        if report.device != parts[2]:
            raise proto.ProtocolError(
                f"report for device {report.device} arrived on {parts[2]}'s subject"
            )
        with self._read() as conn:
            device = proj.get_device(conn, report.device)
        if device is None:
            raise proto.ProtocolError(f"report from unknown device {report.device}")
        if isinstance(report, proto.TelemetryWindow):
            self._record_telemetry(report)
            return
        self._touch(report.device, report.ts)
        if report.event == proto.STATUS_STARTED:
            return
        last_seq = device["last_report_seq"]
        same_boot = device["last_report_boot"] == report.boot
        if same_boot and last_seq is not None and last_seq >= report.seq:
            return  # already in the ledger (a redelivery after a hub restart)
        common = {
            "device": report.device, "model": report.model, "version": report.version,
            "digest": report.digest, "counter": report.counter, "boot": report.boot,
            "report_seq": report.seq,
        }
        if report.event == proto.STATUS_APPLIED:
            kind = ev.DEVICE_UPDATE_APPLIED
            payload = {**common, "probe_output": [float(v) for v in report.probe_output]}
        else:
            kind = ev.DEVICE_UPDATE_FAILED
            payload = {**common, "reason": report.reason}
        await self._append([NewEvent(kind, report.device, ev.device_subject(report.device),
                                     payload)])

    def _touch(self, device: str, ts: int) -> None:
        with self.store.engine.begin() as conn:
            row = conn.execute(
                proj.TELEMETRY.select().where(proj.TELEMETRY.c.device == device)
            ).first()
            if row is None:
                conn.execute(proj.TELEMETRY.insert().values(device=device, last_seen=ts))
            else:
                conn.execute(
                    proj.TELEMETRY.update()
                    .where(proj.TELEMETRY.c.device == device)
                    .values(last_seen=max(ts, row.last_seen))
                )

    def _record_telemetry(self, w: proto.TelemetryWindow) -> None:
        with self.store.engine.begin() as conn:
            row = conn.execute(
                proj.TELEMETRY.select().where(proj.TELEMETRY.c.device == w.device)
            ).first()
            if row is not None and row.boot == w.boot and row.window_seq >= w.seq:
                return  # a window we already counted
            values = {
                "last_seen": w.end, "boot": w.boot, "window_seq": w.seq,
                "latency_ms_p95": float(w.latency_ms_p95),
            }
            if row is None:
                conn.execute(proj.TELEMETRY.insert().values(
                    device=w.device, inferences=w.count, errors=w.errors, **values))
            else:
                conn.execute(
                    proj.TELEMETRY.update()
                    .where(proj.TELEMETRY.c.device == w.device)
                    .values(inferences=row.inferences + w.count, errors=row.errors + w.errors,
                            **values)
                )


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise CommandError(f"missing or invalid {key!r}: expected text")
    return value


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CommandError(f"missing or invalid {key!r}: expected a non-negative integer")
    return value


def _entry_headers(entry: Entry) -> dict[str, str]:
    return {"Nats-Msg-Id": f"ledger.{entry.seq}", "Ledger-Seq": str(entry.seq),
            "Ledger-Hash": entry.hash.hex(), "Ledger-Prev": entry.prev.hex()}


def _jsonable(value: Any) -> Any:
    """Rows may hold None and floats; canonical encoding takes them as they are."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
