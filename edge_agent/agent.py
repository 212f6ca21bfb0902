"""The edge agent: watch the device's assignment, verify, install, run, report.

Update path for one assignment (every refusal is reported with its reason and the
current model keeps serving):

1. the assignment envelope is signed by the director role and names this device;
2. its counter is above the last one seen (anti-rollback / replay);
3. the release manifest it names (by hash) is signed by the release role;
4. the blob is streamed from the Object Store to a temp file, never past the size
   the manifest states, and its BLAKE3 digest must match;
5. the file is loaded and smoke-tested in a child process, written to the
   inactive slot, loaded here, and the slots switch with an atomic rename.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import nats
import numpy as np
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from . import protocol as proto
from .fetch import BlobTooLarge, FetchError, iter_object_chunks
from .runtime import LoadedModel, ModelRuntimeError, preflight
from .slots import SlotStore, atomic_write_bytes
from .telemetry import TelemetryWindowBuilder
from .trust import TrustError, TrustRoot

log = logging.getLogger("edge_agent")

MODELS_BUCKET = "models"
MANIFESTS_BUCKET = "manifests"
ASSIGNMENTS_BUCKET = "assignments"
OUTBOX_LIMIT = 1000


class UpdateRefused(Exception):
    """The update's data is bad or untrusted; retrying the same assignment won't help."""


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    nats_url: str
    state_dir: Path
    trust_root: Path
    inference_hz: float = 20.0
    window_seconds: float = 5.0
    fetch_retries: int = 5


class EdgeAgent:
    def __init__(self, config: AgentConfig) -> None:
        proto.check_device_id(config.device_id)
        self.config = config
        self.device_id = config.device_id
        self.trust = TrustRoot.load(config.trust_root)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.slots = SlotStore(config.state_dir)
        self.slots.discard_stale_temp_files()
        self._state_path = config.state_dir / "agent.json"
        self.last_counter = self._load_last_counter()
        self.boot = secrets.token_hex(4)
        self._seq = 0
        self.model: LoadedModel | None = None
        self.model_meta: dict[str, Any] = {}
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._outbox: asyncio.Queue[tuple[str, bytes, str]] = asyncio.Queue(OUTBOX_LIMIT)
        self.dropped_reports = 0
        self._window = TelemetryWindowBuilder()
        self._rng = np.random.default_rng()
        self.installs = 0  # successful switches in this process (tests read it)

    # ------------------------------------------------------------ state

    def _load_last_counter(self) -> int:
        try:
            return int(json.loads(self._state_path.read_text())["last_counter"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as exc:
            # Safer to fall back to the installed model's counter than to zero.
            log.warning("agent state %s unreadable (%s); using the active slot",
                        self._state_path, exc)
            active = self.slots.active()
            return int(active.metadata.get("counter", 0)) if active else 0

    def _save_last_counter(self, counter: int) -> None:
        self.last_counter = counter
        atomic_write_bytes(self._state_path, json.dumps({"last_counter": counter}).encode())

    def _load_active_model(self) -> None:
        active = self.slots.active()
        if active is None:
            log.info("no model installed yet")
            return
        try:
            self.model = LoadedModel.load(active.path)
            self.model_meta = dict(active.metadata)
            log.info("running %s/%s from slot %s", self.model_meta.get("model"),
                     self.model_meta.get("version"), active.name)
        except ModelRuntimeError as exc:
            log.error("active model does not load: %s", exc)
            self.model = None

    # ------------------------------------------------------------ main loop

    async def run(self, stop: asyncio.Event) -> None:
        self._load_active_model()
        self._nc = await nats.connect(
            self.config.nats_url,
            name=f"edge-agent:{self.device_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        self._js = self._nc.jetstream()
        self._report_status(proto.STATUS_STARTED, reason="")
        tasks = [
            asyncio.create_task(self._send_outbox(), name="outbox"),
            asyncio.create_task(self._watch_assignments(), name="watch"),
            asyncio.create_task(self._inference_loop(), name="inference"),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._flush_outbox(timeout=2.0)
            with contextlib.suppress(Exception):
                await self._nc.close()

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None
        return self._js

    async def _watch_assignments(self) -> None:
        while True:
            try:
                kv = await self.js.key_value(ASSIGNMENTS_BUCKET)
                watcher = await kv.watch(self.device_id)
            except (BucketNotFoundError, NotFoundError):
                log.info("assignments bucket not there yet; is the hub running?")
                await asyncio.sleep(1.0)
                continue
            except Exception as exc:
                log.warning("cannot watch assignments: %s", exc)
                await asyncio.sleep(1.0)
                continue
            try:
                while True:
                    try:
                        entry = await watcher.updates(timeout=5.0)
                    except TimeoutError:
                        continue
                    if entry is None or entry.value is None or entry.operation is not None:
                        continue  # "caught up" marker, or a delete/purge
                    await self.handle_assignment(entry.value)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await watcher.stop()
                raise
            except Exception as exc:
                log.warning("assignment watch failed (%s); restarting it", exc)
                with contextlib.suppress(Exception):
                    await watcher.stop()
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------ updates

    async def handle_assignment(self, data: bytes) -> None:
        assignment: proto.Assignment | None = None
        try:
            assignment = self._verify_assignment(data)
            if assignment is None:
                return
            for attempt in range(1, self.config.fetch_retries + 1):
                try:
                    await self._install(assignment)
                    return
                except FetchError as exc:
                    if attempt == self.config.fetch_retries:
                        raise UpdateRefused(f"download failed {attempt} times: {exc}") from exc
                    log.warning("download failed (%s); retrying", exc)
                    await asyncio.sleep(min(5.0, 0.5 * attempt))
        except (UpdateRefused, proto.ProtocolError, TrustError) as exc:
            log.error("update refused: %s", exc)
            if assignment is not None and assignment.counter > self.last_counter:
                # Remember we saw it so a replay of the same bad assignment is ignored.
                self._save_last_counter(assignment.counter)
            self._report_status(proto.STATUS_FAILED, reason=str(exc), assignment=assignment)

    def _verify_assignment(self, data: bytes) -> proto.Assignment | None:
        envelope = proto.SignedEnvelope.decode(data, "assignment")
        doc = self.trust.verify(envelope, "director", proto.DOMAIN_ASSIGNMENT)
        assignment = proto.Assignment.from_map(doc)
        if assignment.device != self.device_id:
            raise UpdateRefused(
                f"assignment is for device {assignment.device}, not {self.device_id}"
            )
        if assignment.counter <= self.last_counter:
            if self.model_meta.get("counter") == assignment.counter:
                log.info("assignment %d already installed", assignment.counter)
                return None
            if assignment.counter == self.last_counter:
                return None  # seen and already reported on
            raise UpdateRefused(
                f"assignment counter {assignment.counter} is not above the last seen "
                f"{self.last_counter}: rollback or replay refused"
            )
        return assignment

    async def _load_manifest(self, assignment: proto.Assignment) -> proto.ReleaseManifest:
        kv = await self.js.key_value(MANIFESTS_BUCKET)
        key = proto.manifest_key(assignment.model, assignment.version)
        try:
            entry = await kv.get(key)
        except KeyNotFoundError as exc:
            raise UpdateRefused(f"release manifest {key} not found") from exc
        raw = entry.value or b""
        if blake3.blake3(raw).hexdigest() != assignment.manifest_hash:
            raise UpdateRefused(
                f"manifest {key} is not the one the assignment names (hash differs)"
            )
        envelope = proto.SignedEnvelope.decode(raw, "release manifest")
        manifest = proto.ReleaseManifest.from_map(
            self.trust.verify(envelope, "release", proto.DOMAIN_MANIFEST)
        )
        if (manifest.name, manifest.version, manifest.digest) != (
            assignment.model, assignment.version, assignment.digest
        ):
            raise UpdateRefused("manifest and assignment disagree on model, version or digest")
        return manifest

    async def _install(self, assignment: proto.Assignment) -> None:
        manifest = await self._load_manifest(assignment)
        meta = {
            "model": manifest.name, "version": manifest.version, "digest": manifest.digest,
            "counter": assignment.counter, "manifest_hash": assignment.manifest_hash,
        }
        active = self.slots.active()
        if active is not None and active.metadata.get("digest") == manifest.digest and self.model:
            # Same bytes already running: record the new assignment, no download.
            self.slots.activate(active.name, meta)
        else:
            await self._download_and_switch(manifest, meta)
        self._save_last_counter(assignment.counter)
        self.installs += 1
        probe = self.model.smoke_test() if self.model is not None else np.zeros(0)
        log.info("installed %s/%s (counter %d)", manifest.name, manifest.version,
                 assignment.counter)
        self._report_status(proto.STATUS_APPLIED, reason="", assignment=assignment,
                            probe_output=[float(v) for v in probe.ravel()])

    async def _download_and_switch(
        self, manifest: proto.ReleaseManifest, meta: dict[str, Any]
    ) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=self.slots.slots_dir, prefix=".download.",
                                        suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            hasher = blake3.blake3()
            with os.fdopen(fd, "wb") as fh:
                try:
                    async for chunk in iter_object_chunks(
                        self.js, MODELS_BUCKET, manifest.digest, manifest.size
                    ):
                        hasher.update(chunk)
                        fh.write(chunk)
                except BlobTooLarge as exc:
                    raise UpdateRefused(str(exc)) from exc
            if hasher.hexdigest() != manifest.digest:
                raise UpdateRefused(
                    f"downloaded blob's BLAKE3 digest {hasher.hexdigest()[:16]}... does not "
                    f"match the signed manifest's {manifest.digest[:16]}..."
                )
            try:
                # In a child process first: a crashing runtime must not take the agent down.
                await asyncio.to_thread(preflight, tmp)
            except ModelRuntimeError as exc:
                raise UpdateRefused(f"model does not load: {exc}") from exc
            slot = self.slots.inactive_name()
            path = self.slots.write_inactive(_file_chunks(tmp))
            try:
                loaded = LoadedModel.load(path)
                loaded.smoke_test()
            except ModelRuntimeError as exc:
                raise UpdateRefused(f"model does not load: {exc}") from exc
            self.slots.activate(slot, meta)
            self.model, self.model_meta = loaded, dict(meta)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # ------------------------------------------------------------ inference + telemetry

    async def _inference_loop(self) -> None:
        period = 1.0 / self.config.inference_hz if self.config.inference_hz > 0 else None
        window_end = time.monotonic() + self.config.window_seconds
        while True:
            if period is not None and self.model is not None:
                model = self.model
                started = time.perf_counter()
                ok = True
                try:
                    model.run(model.generated_input(self._rng))
                except ModelRuntimeError as exc:
                    ok = False
                    log.debug("inference failed: %s", exc)
                self._window.record((time.perf_counter() - started) * 1000.0, ok)
            if time.monotonic() >= window_end:
                window_end = time.monotonic() + self.config.window_seconds
                self._emit_window()
            await asyncio.sleep(period if period is not None else self.config.window_seconds)

    def _emit_window(self) -> None:
        summary = self._window.take()
        if summary is None:
            return
        window = proto.TelemetryWindow(
            device=self.device_id, boot=self.boot, seq=self._next_seq(),
            model=str(self.model_meta.get("model", "")),
            version=str(self.model_meta.get("version", "")),
            digest=str(self.model_meta.get("digest", "")),
            **summary,
        )
        self._enqueue("telemetry", proto.encode_report(window), window.seq)

    # ------------------------------------------------------------ reports

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _report_status(
        self,
        event: str,
        reason: str,
        assignment: proto.Assignment | None = None,
        probe_output: list[float] | None = None,
    ) -> None:
        meta = self.model_meta
        report = proto.StatusReport(
            device=self.device_id, boot=self.boot, seq=self._next_seq(), ts=time.time_ns(),
            event=event,
            model=assignment.model if assignment else str(meta.get("model", "")),
            version=assignment.version if assignment else str(meta.get("version", "")),
            digest=assignment.digest if assignment else str(meta.get("digest", "")),
            counter=assignment.counter if assignment else int(meta.get("counter", 0)),
            reason=reason[:1000],
            probe_output=probe_output or [],
        )
        self._enqueue("status", proto.encode_report(report), report.seq)

    def _enqueue(self, kind: str, data: bytes, seq: int) -> None:
        item = (proto.report_subject(self.device_id, kind), data,
                proto.report_msg_id(self.device_id, self.boot, seq))
        if self._outbox.full():
            # Bounded memory: drop the oldest and count it, so loss is never silent.
            self._outbox.get_nowait()
            self.dropped_reports += 1
        self._outbox.put_nowait(item)

    async def _send_outbox(self) -> None:
        while True:
            subject, data, msg_id = await self._outbox.get()
            await self._publish_until_acked(subject, data, msg_id)

    async def _publish_until_acked(self, subject: str, data: bytes, msg_id: str) -> None:
        delay = 0.2
        while True:
            try:
                await self.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}, timeout=5)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disconnected or stream not there yet: retry
                log.debug("report publish failed (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _flush_outbox(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._outbox.empty() and time.monotonic() < deadline:
            subject, data, msg_id = self._outbox.get_nowait()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._publish_until_acked(subject, data, msg_id),
                    max(0.1, deadline - time.monotonic()),
                )


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk
