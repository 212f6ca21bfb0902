"""The edge agent: watch the device's assignment, verify, install, run, report.

Update path for one assignment (every refusal is reported with its reason and the
current model keeps serving):

1. the assignment envelope is signed by the director role and names this device;
2. its counter is above the last one seen (anti-rollback / replay);
3. the release manifest it names (by hash) is signed by the release role;
4. the blob is streamed from the Object Store to a partial file that survives a lost
   connection or a restart (edge_agent.download), never past the size the manifest
   states, and its BLAKE3 digest must match;
5. the file is loaded and smoke-tested in a child process, moved into the inactive
   slot, loaded here, and the slots switch with an atomic rename;
6. a health window watches the new model (edge_agent.health); a load failure, too many
   inference errors or a crash loop reverts to the previous slot, reported as
   `reverted` with the evidence.

One update runs at a time: a newer assignment cancels the one in progress (its partial
download stays on disk and is resumed if the same blob is wanted again).

Test hook: the environment variable FLEET_AGENT_FAULTS injects faults, as a comma
separated list of `key:value` items: `error_rate:R` (fail that fraction of inferences),
`load_error:1` (the active model fails to load at start), `version:V` (only while a model
of version V is active). Example: `FLEET_AGENT_FAULTS=error_rate:1.0,version:2`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import secrets
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from edge_agent import protocol as proto
from edge_agent import update
from edge_agent.download import DownloadStats, ResumableDownload
from edge_agent.errors import (
    FetchError,
    ModelRuntimeError,
    TransferError,
    UpdateRefused,
)
from edge_agent.health import HealthWindow
from edge_agent.protocol import names
from edge_agent.protocol.names import (
    ASSIGNMENTS_BUCKET,
    MANIFESTS_BUCKET,
    MODELS_BUCKET,
    ROOT_LATEST_KEY,
    ROOTS_BUCKET,
)
from edge_agent.runtime import LoadedModel, preflight
from edge_agent.slots import SlotStore, atomic_write_bytes
from edge_agent.spool import Spool
from edge_agent.telemetry import TelemetryWindowBuilder
from edge_agent.transport import buckets
from edge_agent.transport.connect import NatsAuth
from edge_agent.transport.connect import connect as nats_connect
from edge_agent.transport.kv_watch import KeyWatch, flow_control_without_polling
from edge_agent.transport.roots import RootUpdater
from edge_agent.trust.inclusion import wait_for_inclusion
from edge_agent.trust.root import TrustRoot
from ledger.signing import KeyFileError, SigningKey

log = logging.getLogger("edge_agent")

DEFAULT_SPOOL_BYTES = 8 * 1024 * 1024
FAULTS_ENV = "FLEET_AGENT_FAULTS"
STATS_NAME = "stats.json"


@dataclass(frozen=True)
class Faults:
    """Injected faults for tests (see the module docstring); none by default."""

    error_rate: float = 0.0
    load_error: bool = False
    version: str | None = None
    install_error: bool = False  # refuse to install (the assignment's version must match)
    output_shift: float = 0.0  # added to every output before it is counted (drift)

    @classmethod
    def parse(cls, spec: str) -> Faults:
        values: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            key, _, value = item.partition(":")
            values[key.strip()] = value.strip()
        try:
            return cls(
                error_rate=float(values.get("error_rate", 0.0)),
                load_error=values.get("load_error", "0") not in ("", "0", "false"),
                version=values.get("version") or None,
                install_error=values.get("install_error", "0") not in ("", "0", "false"),
                output_shift=float(values.get("output_shift", 0.0)),
            )
        except ValueError as exc:
            raise ValueError(f"{FAULTS_ENV}={spec!r} is not valid: {exc}") from exc

    def applies(self, meta: dict[str, Any]) -> bool:
        return self.version is None or str(meta.get("version")) == self.version


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    nats_url: str
    state_dir: Path
    trust_root: Path
    inference_hz: float = 20.0
    window_seconds: float = 5.0
    fetch_retries: int = 5
    health_window: float = 30.0
    max_error_rate: float = 0.5
    faults: str | None = None  # None: read FLEET_AGENT_FAULTS
    device_key: Path | None = None  # signs status reports; without it the hub refuses them
    nats_ca: Path | None = None  # the NATS server's CA certificate (TLS); from the bundle
    spool_max_bytes: int = DEFAULT_SPOOL_BYTES  # reports kept on disk until acked
    spool_fsync: bool = True
    isolate_preflight: bool = True  # smoke-test a new model in a child process first
    # Model transparency: install only releases proven in a witnessed checkpoint.
    require_inclusion: bool = False


class EdgeAgent:
    def __init__(self, config: AgentConfig) -> None:
        proto.check_device_id(config.device_id)
        self.config = config
        self.device_id = config.device_id
        config.state_dir.mkdir(parents=True, exist_ok=True)
        # The pinned root, or a newer one accepted by an earlier chain walk.
        self.roots = RootUpdater(config.trust_root, config.state_dir)
        self.device_key = _load_device_key(config.device_key)
        self.slots = SlotStore(config.state_dir)
        self.slots.discard_stale_temp_files()
        self._state_path = config.state_dir / "agent.json"
        self._stats_path = config.state_dir / STATS_NAME
        self.last_counter = self._load_last_counter()
        self.health = HealthWindow(config.state_dir, config.health_window, config.max_error_rate)
        spec = config.faults if config.faults is not None else os.environ.get(FAULTS_ENV, "")
        self.faults = Faults.parse(spec)
        self.boot = secrets.token_hex(4)
        self._seq = 0
        self.model: LoadedModel | None = None
        self.model_meta: dict[str, Any] = {}
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        # Reports wait on disk until JetStream acknowledges them (edge_agent/spool.py).
        self.spool = Spool(config.state_dir / "spool", max_bytes=config.spool_max_bytes,
                           fsync=config.spool_fsync)
        self._spooled = asyncio.Event()
        self._window = TelemetryWindowBuilder()
        self._window_meta: dict[str, Any] = {}  # the model the open window counts
        self._rng = np.random.default_rng()
        self.installs = 0  # successful switches in this process (tests read it)
        self.download_stats = DownloadStats()
        # Resident memory (KiB) around downloads: a blob must stream, not pile up here.
        self._rss_kib: dict[str, int] = {"at_start": _rss_kib()}
        self._update_task: asyncio.Task[None] | None = None
        self._inflight: proto.Assignment | None = None
        self._rewatch = asyncio.Event()
        self._assignment_watch: KeyWatch | None = None  # woken on reconnect
        self._stopping = False

    @property
    def watching(self) -> bool:
        """True once the agent watches its assignment key (a new one reaches it now)."""
        return self._assignment_watch is not None

    @property
    def trust(self) -> TrustRoot:
        return self.roots.trust

    async def refresh_roots(self) -> None:
        """Walk to the newest published trust root; report a refused one."""
        try:
            refused = await self.roots.refresh(self.js)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # disconnected: the next assignment or watch tries again
            log.warning("cannot check for a newer trust root: %s", exc)
            return
        if refused is not None:
            self._report_status(proto.STATUS_FAILED, reason=refused)

    async def _watch_roots(self) -> None:
        while not self._stopping:
            await self.refresh_roots()
            try:
                kv = await buckets.key_value(self.js, ROOTS_BUCKET)
                watcher = await kv.watch(ROOT_LATEST_KEY)
                flow_control_without_polling(getattr(watcher, "_sub", None))
                try:
                    while not self._stopping:
                        with contextlib.suppress(TimeoutError):
                            entry = await watcher.updates(timeout=30.0)
                            if entry is not None and entry.value:
                                await self.refresh_roots()
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no bucket yet, or reconnecting
                log.debug("trust root watch: %s", exc)
                await asyncio.sleep(2.0)

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

    def _write_stats(self) -> None:
        """Transfer counters and peak memory, for operators and tests (stats.json)."""
        rss = _rss_kib()
        if "download_max" in self._rss_kib:  # sampled at every download checkpoint
            self._rss_kib["download_max"] = max(self._rss_kib["download_max"], rss)
        stats = {"boot": self.boot, "download": asdict(self.download_stats),
                 "rss_kib": {**self._rss_kib, "now": rss, "peak": _peak_rss_kib()}}
        with contextlib.suppress(OSError):
            atomic_write_bytes(self._stats_path, json.dumps(stats).encode())

    def _start_up(self) -> None:
        """Count this start in an open health window, then load the active model."""
        active = self.slots.active()
        crash_loop = self.health.on_boot(active.metadata.get("digest") if active else None)
        if crash_loop is not None and active is not None:
            self.model_meta = dict(active.metadata)
            log.error("%s", crash_loop)
            if self._revert(crash_loop):
                return
        self._load_active_model()

    def _load_active_model(self) -> None:
        active = self.slots.active()
        if active is None:
            log.info("no model installed yet")
            return
        self.model_meta = dict(active.metadata)
        try:
            if self.faults.load_error and self.faults.applies(self.model_meta):
                raise ModelRuntimeError(f"{active.path}: load failure injected by {FAULTS_ENV}")
            self.model = LoadedModel.load(active.path, mapped=True)
            log.info("running %s/%s from slot %s", self.model_meta.get("model"),
                     self.model_meta.get("version"), active.name)
        except ModelRuntimeError as exc:
            log.error("active model does not load: %s", exc)
            self.model = None
            self._revert(f"load error: {exc}")

    # ------------------------------------------------------------ main loop

    async def run(self, stop: asyncio.Event) -> None:
        self._start_up()

        async def on_reconnect() -> None:
            self._rewatch.set()  # a watch may not survive a server restart
            if self._assignment_watch is not None:
                self._assignment_watch.wake()

        self._nc = await nats_connect(
            self.config.nats_url, self.nats_auth(),
            name=f"edge-agent:{self.device_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            reconnected_cb=on_reconnect,
        )
        self._js = self._nc.jetstream()
        self._report_status(proto.STATUS_STARTED, reason="")
        tasks = [
            asyncio.create_task(self._send_outbox(), name="outbox"),
            asyncio.create_task(self._watch_assignments(), name="watch"),
            asyncio.create_task(self._watch_roots(), name="roots"),
            asyncio.create_task(self._inference_loop(), name="inference"),
        ]
        try:
            await stop.wait()
        finally:
            log.info("stopping")
            self._stopping = True
            if self._update_task is not None:
                tasks.append(self._update_task)
            for task in tasks:
                task.cancel()
            # Bounded: a library call that swallows a cancellation (asyncio.wait_for in
            # Python 3.11 can) must not keep the agent from stopping.
            _, pending = await asyncio.wait(tasks, timeout=3.0)
            if pending:
                log.warning("tasks did not stop in time: %s",
                            ", ".join(t.get_name() for t in pending))
            await self._flush_outbox(timeout=2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 2.0)
            log.info("stopped")

    def nats_auth(self) -> NatsAuth:
        """The device key is the device's NATS identity (an nkey); TLS with the bundle's CA."""
        if self.device_key is None:
            return NatsAuth(ca_file=self.config.nats_ca)
        return NatsAuth.for_device(self.device_id, self.device_key.private_raw(),
                                   self.config.nats_ca)

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None
        return self._js

    async def _watch_assignments(self) -> None:
        while not self._stopping:
            self._rewatch.clear()
            try:
                # Not kv.watch(): its consumer-create subject does not name the key, so
                # the server could not confine a device to its own (edge_agent/kv_watch.py).
                watcher = await KeyWatch.start(self.js, ASSIGNMENTS_BUCKET, self.device_id)
                self._assignment_watch = watcher
            except (BucketNotFoundError, NotFoundError):
                log.info("assignments bucket not there yet; is the hub running?")
                await asyncio.sleep(1.0)
                continue
            except Exception as exc:
                log.warning("cannot watch assignments: %s", exc)
                await asyncio.sleep(1.0)
                continue
            try:
                while not self._rewatch.is_set() and not self._stopping:
                    try:
                        # Long: a reconnect wakes it (on_reconnect), a stop cancels it.
                        entry = await watcher.updates(timeout=30.0)
                    except TimeoutError:
                        continue
                    if entry.operation is not None:
                        continue  # a delete/purge
                    await self.handle_assignment(entry.value)
                if self._rewatch.is_set():
                    log.info("reconnected; watching the assignment again")
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await watcher.stop()
                raise
            except Exception as exc:
                log.warning("assignment watch failed (%s); restarting it", exc)
                await asyncio.sleep(0.5)
            with contextlib.suppress(Exception):
                await watcher.stop()

    # ------------------------------------------------------------ updates

    async def handle_assignment(self, data: bytes) -> None:
        """Check an assignment; start installing it if it is new (cancelling an older one)."""
        await self.refresh_roots()  # an assignment may be signed by a newly rotated key
        try:
            assignment = self._verify_assignment(data)
        except UpdateRefused as exc:
            log.error("update refused: %s", exc)
            self._report_status(proto.STATUS_FAILED, reason=str(exc), assignment=exc.assignment)
            return
        if assignment is None:
            return
        task = self._update_task
        if task is not None and not task.done():
            assert self._inflight is not None
            log.info("assignment %d supersedes %d still in progress; cancelling that",
                     assignment.counter, self._inflight.counter)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._inflight = assignment
        self._update_task = asyncio.create_task(
            self._apply(assignment), name=f"update-{assignment.counter}"
        )

    def _verify_assignment(self, data: bytes) -> proto.Assignment | None:
        """The assignment if it is authentic, for us and new; None if already handled."""
        inflight = self._inflight.counter if self._inflight is not None else None
        installed = self.model_meta.get("counter") if self.model is not None else None
        return update.check_assignment(
            self.trust, self.device_id, update.Counters(self.last_counter, inflight, installed),
            data,
        )

    async def _apply(self, assignment: proto.Assignment) -> None:
        try:
            for attempt in range(1, self.config.fetch_retries + 1):
                try:
                    await self._install(assignment)
                    return
                except TransferError as exc:
                    if attempt == self.config.fetch_retries:
                        raise UpdateRefused(f"download failed {attempt} times: {exc}") from exc
                    log.warning("transfer failed (%s); retrying", exc)
                    await asyncio.sleep(min(5.0, 0.5 * attempt))
        except asyncio.CancelledError:
            log.info("update to counter %d cancelled", assignment.counter)
            raise
        except Exception as exc:
            if isinstance(exc, UpdateRefused):
                log.error("update refused: %s", exc)
                reason = str(exc)
            else:  # a bug or a local fault (disk full): still reported, never silent
                log.exception("update to counter %d failed", assignment.counter)
                reason = f"internal error installing the update: {exc!r}"
            if assignment.counter > self.last_counter:
                # Remember we saw it so a replay of the same bad assignment is ignored.
                self._save_last_counter(assignment.counter)
            self._report_status(proto.STATUS_FAILED, reason=reason, assignment=assignment)
        finally:
            if self._inflight is assignment:
                self._inflight = None

    async def _load_manifest(self, assignment: proto.Assignment) -> proto.ReleaseManifest:
        key = names.manifest_key(assignment.model, assignment.version)
        try:
            kv = await buckets.key_value(self.js, MANIFESTS_BUCKET)
            entry = await kv.get(key)
        except KeyNotFoundError as exc:
            raise UpdateRefused(f"release manifest {key} not found") from exc
        except (asyncio.CancelledError, UpdateRefused):
            raise
        except Exception as exc:  # disconnected, timed out
            raise FetchError(f"cannot read release manifest {key}: {exc!r}") from exc
        return update.check_manifest(self.trust, assignment, entry.value or b"")

    async def _install(self, assignment: proto.Assignment) -> None:
        manifest = await self._load_manifest(assignment)
        if self.config.require_inclusion:
            # Waits while the release is not witnessed yet; InclusionRefused is an
            # UpdateRefused.
            await wait_for_inclusion(lambda: self.js, lambda: self.trust, assignment)
        meta = {
            "model": manifest.name, "version": manifest.version, "digest": manifest.digest,
            "counter": assignment.counter, "manifest_hash": assignment.manifest_hash,
            "drift_bins": manifest.drift_bins,  # telemetry bins outputs on these edges
        }
        if self.faults.install_error and self.faults.applies(meta):
            raise UpdateRefused(f"install failure injected by {FAULTS_ENV}")
        active = self.slots.active()
        if active is not None and active.metadata.get("digest") == manifest.digest and self.model:
            # Same bytes already running: record the new assignment, no download.
            self.slots.activate(active.name, meta)
            self.model_meta = dict(meta)
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
        download = ResumableDownload(
            self.slots.slots_dir, lambda: self.js, MODELS_BUCKET, manifest.digest,
            manifest.size, stats=self.download_stats, on_checkpoint=self._write_stats,
        )
        self._rss_kib["before_download"] = self._rss_kib["download_max"] = _rss_kib()
        wire_before = self.download_stats.bytes_received
        try:  # BlobTooLarge and DigestMismatch are UpdateRefused: not retried
            path = await download.run()
        finally:
            self._write_stats()
        log.info("downloaded %s: %d bytes over the wire for a %d-byte blob",
                 manifest.digest[:16], self.download_stats.bytes_received - wire_before,
                 manifest.size)
        try:
            # In a child process first: a crashing runtime must not take the agent down.
            if self.config.isolate_preflight:
                await asyncio.to_thread(preflight, path)
        except ModelRuntimeError as exc:
            download.discard()
            raise UpdateRefused(f"model does not load: {exc}") from exc
        # From here to the switch nothing awaits, so no other update or revert interleaves.
        slot = self.slots.install_inactive(path)
        try:
            loaded = LoadedModel.load(self.slots.slot_path(slot), mapped=True)
            loaded.smoke_test()
        except ModelRuntimeError as exc:
            raise UpdateRefused(f"model does not load: {exc}") from exc
        self.health.start(meta)
        self.slots.activate(slot, meta)
        self.model, self.model_meta = loaded, dict(meta)

    # ------------------------------------------------------------ health + revert

    def _revert(self, evidence: str) -> bool:
        """Go back to the previous slot; report `reverted` with the evidence."""
        bad = dict(self.model_meta)
        previous = self.slots.previous()
        if previous is None:
            log.error("cannot revert (%s): no previous model to go back to", evidence)
            self.health.clear()
            return False
        try:
            digest = _file_digest(previous.path)
            if digest != previous.metadata.get("digest"):
                raise ModelRuntimeError(f"{previous.path} does not match its recorded digest")
            loaded = LoadedModel.load(previous.path, mapped=True)
            loaded.smoke_test()
        except (ModelRuntimeError, OSError) as exc:
            log.error("cannot revert (%s): the previous model is unusable: %s", evidence, exc)
            self.health.clear()
            return False
        self.slots.revert()
        self.health.clear()
        self.model, self.model_meta = loaded, dict(previous.metadata)
        reason = (f"{evidence}; reverted {bad.get('model')}/{bad.get('version')} "
                  f"(counter {bad.get('counter')}) to {previous.metadata.get('model')}/"
                  f"{previous.metadata.get('version')}")
        log.error("%s", reason)
        # The model fields name what runs now; the counter is the reverted assignment's.
        self._report_status(proto.STATUS_REVERTED, reason=reason,
                            counter=int(bad.get("counter", 0)))
        return True

    # ------------------------------------------------------------ inference + telemetry

    async def _inference_loop(self) -> None:
        period = 1.0 / self.config.inference_hz if self.config.inference_hz > 0 else None
        window_end = time.monotonic() + self.config.window_seconds
        while True:
            if period is not None and self.model is not None:
                self._infer_once(self.model)
            if self.health.expired():
                log.info("health window of %s/%s passed", self.model_meta.get("model"),
                         self.model_meta.get("version"))
                self.health.clear()
            if time.monotonic() >= window_end:
                window_end = time.monotonic() + self.config.window_seconds
                self._emit_window()
            await asyncio.sleep(period if period is not None else self.config.window_seconds)

    def _infer_once(self, model: LoadedModel) -> None:
        meta = self.model_meta
        if (self._window_meta.get("digest"), self._window_meta.get("counter")) != (
            meta.get("digest"), meta.get("counter")
        ):
            self._emit_window()  # the previous model's last window
            self._window_meta = dict(meta)
            self._window.set_drift_bins(meta.get("drift_bins") or [])
        started = time.perf_counter()
        ok = True
        faults = self.faults
        output = None
        try:
            if faults.error_rate and faults.applies(meta) and (
                self._rng.random() < faults.error_rate
            ):
                raise ModelRuntimeError(f"inference failure injected by {FAULTS_ENV}")
            output = model.run(model.generated_input(self._rng))
            if faults.output_shift and faults.applies(meta):
                output = output + faults.output_shift
        except ModelRuntimeError as exc:
            ok = False
            log.debug("inference failed: %s", exc)
        self._window.record((time.perf_counter() - started) * 1000.0, ok, output)
        watching = self.health.watching
        if watching is not None and watching.digest == self.model_meta.get("digest"):
            evidence = self.health.record(ok)
            if evidence is not None:
                self._emit_window()  # the failing model's last window, before the switch
                self._revert(evidence)

    def _emit_window(self) -> None:
        summary = self._window.take()
        if summary is None:
            return
        meta = self._window_meta
        window = proto.TelemetryWindow(
            device=self.device_id, boot=self.boot, seq=self._next_seq(),
            model=str(meta.get("model", "")), version=str(meta.get("version", "")),
            digest=str(meta.get("digest", "")), counter=int(meta.get("counter", 0)),
            dropped=self.spool.dropped, **summary,
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
        counter: int | None = None,
    ) -> None:
        meta = self.model_meta
        if counter is None:
            counter = assignment.counter if assignment else int(meta.get("counter", 0))
        report = proto.StatusReport(
            device=self.device_id, boot=self.boot, seq=self._next_seq(), ts=time.time_ns(),
            event=event,
            model=assignment.model if assignment else str(meta.get("model", "")),
            version=assignment.version if assignment else str(meta.get("version", "")),
            digest=assignment.digest if assignment else str(meta.get("digest", "")),
            counter=counter,
            reason=reason[:1000],
            probe_output=probe_output or [],
        )
        data = (proto.encode_signed_report(report, self.device_key) if self.device_key
                else proto.encode_report(report))  # unsigned: the hub will refuse it
        self._enqueue("status", data, report.seq)

    @property
    def dropped_reports(self) -> int:
        return self.spool.dropped

    def _enqueue(self, kind: str, data: bytes, seq: int) -> None:
        # Durable and bounded: a full spool drops its oldest and counts it (never silent).
        self.spool.append(names.report_subject(self.device_id, kind),
                          names.report_msg_id(self.device_id, self.boot, seq), data)
        self._spooled.set()

    async def _send_outbox(self) -> None:
        while not self._stopping:
            record = self.spool.peek()
            if record is None:
                self._spooled.clear()
                await self._spooled.wait()
                continue
            await self._publish_until_acked(record.subject, record.data, record.msg_id)
            self.spool.ack(record)

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
        """Try to send what is spooled; what is left stays on disk for the next start."""
        deadline = time.monotonic() + timeout
        while (record := self.spool.peek()) is not None and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(
                    self._publish_until_acked(record.subject, record.data, record.msg_id),
                    max(0.1, deadline - time.monotonic()),
                )
            except Exception:
                return
            self.spool.ack(record)


def _load_device_key(path: Path | None) -> SigningKey | None:
    if path is None:
        log.warning("no device key: status reports go unsigned and the hub refuses them")
        return None
    try:
        return SigningKey.load(path)
    except KeyFileError as exc:
        raise ValueError(f"device key: {exc}") from exc


def _peak_rss_kib() -> int:
    """This process's peak resident memory so far, in KiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS counts bytes


def _rss_kib() -> int:
    """This process's resident memory now, in KiB (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return _peak_rss_kib()


def _file_digest(path: Path) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()
