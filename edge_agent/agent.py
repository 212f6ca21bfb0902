"""The edge agent: watch the device's assignment, verify, install, run, report.

Update path for one assignment (every refusal is reported with its reason and the
current model keeps serving):

1. the assignment envelope is signed by the director role and names this device;
2. its counter is above the last one seen (anti-rollback / replay);
   and a fresh timestamp (signed by the timestamp role, unexpired, not older than the
   last one accepted) names the trust root the device holds: otherwise the assignment is
   held back (reported once per reason, nothing recorded) and tried again with backoff
   until fresh authority comes, while the installed model keeps serving;
3. the release manifest it names (by hash) is signed by the release role;
4. the blob is streamed from the Object Store to a partial file that survives a lost
   connection or a restart (edge_agent.download), never past the size the manifest
   states, and its BLAKE3 digest must match;
5. the file is loaded and smoke-tested in a child process, moved into the inactive
   slot, loaded here, and the slots switch with an atomic rename;
6. a health window watches the new model (edge_agent.health); a load failure, too many
   inference errors or a crash loop reverts to the previous slot, reported as
   `reverted` with the evidence.

Steps 1-3 are the pure policy in edge_agent.update; the network is behind
edge_agent.transport, the reports in edge_agent.reporter. This module orchestrates.

One update runs at a time: a newer assignment cancels the one in progress (its partial
download stays on disk and is resumed if the same blob is wanted again).

Applications on the device run the installed model through the local inference API
(edge_agent.serving, a Unix-domain socket, STATE/agent.sock by default); every call is
counted in the telemetry window and the health window. `synthetic_load` adds a loop of
inferences on generated inputs, for demos, simulators and benchmarks only.

Faults can be injected for tests (edge_agent.faults, FLEET_AGENT_FAULTS).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np
from numpy.typing import NDArray

from edge_agent import protocol as proto
from edge_agent import update
from edge_agent.boots import next_boot
from edge_agent.download import PARTIAL_NAME, DownloadStats, ResumableDownload
from edge_agent.errors import (
    DiskFull,
    InferenceError,
    ModelRuntimeError,
    NotPublished,
    StaleAuthority,
    TransferError,
    UpdateRefused,
)
from edge_agent.faults import FAULTS_ENV, Faults
from edge_agent.faults import enospc as faults_enospc
from edge_agent.health import HealthWindow
from edge_agent.protocol import bins, names
from edge_agent.reporter import Reporter
from edge_agent.runtime import LoadedModel, preflight
from edge_agent.serving.server import InferenceServer, Serving
from edge_agent.slots import ActiveSlot, SlotStore
from edge_agent.spool import Spool
from edge_agent.transport import KeyUpdates
from edge_agent.transport.connect import NatsAuth
from edge_agent.transport.inclusion import wait_for_inclusion
from edge_agent.transport.nats_transport import NatsTransport, close_quietly
from edge_agent.transport.roots import RootUpdater
from edge_agent.trust.root import TrustRoot
from ledger.durable import atomic_write
from ledger.errors import KeyFileError
from ledger.retry import Stopped
from ledger.signing import SigningKey
from ledger.supervisor import Supervisor

log = logging.getLogger("edge_agent")
TASKS_NAME = "tasks.json"  # the running agent's task states, for `edge-agent status`
TASK_STATES_EVERY_S = 2.0

DEFAULT_SPOOL_BYTES = 8 * 1024 * 1024
STATS_NAME = "stats.json"
TIMESTAMP_NAME = "timestamp.bin"  # the newest timestamp accepted (its version only grows)
API_SOCKET_NAME = "agent.sock"
DISK_MARGIN = 4 * 1024 * 1024  # free space a download leaves (at least; 10% of the blob)


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    nats_url: str
    state_dir: Path
    trust_root: Path
    # Inferences per second on generated inputs, only with synthetic_load (demos,
    # simulators, benchmarks); real calls come through the local inference API.
    inference_hz: float = 20.0
    synthetic_load: bool = False
    serve_api: bool = True  # the local inference API (edge_agent.serving)
    api_socket: Path | None = None  # default: STATE_DIR/agent.sock
    window_seconds: float = 5.0
    fetch_retries: int = 5  # in-place resumes of a download without progress
    fetch_timeout: float = 5.0  # seconds a batch of blob chunks may take to arrive
    # Then the update is tried again after retry_base * 2**n seconds (n: failures so
    # far), at most retry_cap, with jitter; never given up for transfer reasons.
    retry_base: float = 1.0
    retry_cap: float = 30.0
    health_window: float = 30.0
    max_error_rate: float = 0.5
    faults: str | None = None  # None: read FLEET_AGENT_FAULTS (edge_agent.faults)
    device_key: Path | None = None  # signs status reports; without it the hub refuses them
    nats_ca: Path | None = None  # the NATS server's CA certificate (TLS); from the bundle
    # The cluster's JetStream domain, for a device behind an edge site's leaf node
    # (edge_agent.protocol.names.CLUSTER_JS_DOMAIN); None: the server's own JetStream.
    js_domain: str | None = None
    spool_max_bytes: int = DEFAULT_SPOOL_BYTES  # reports kept on disk until acked
    spool_fsync: bool = True
    isolate_preflight: bool = True  # smoke-test a new model in a child process first
    # Model transparency: install only releases proven in a witnessed checkpoint.
    require_inclusion: bool = False
    # Observers for simulators and benchmarks (testkit/fleet_sim.py); called in the
    # agent's event loop, they must not block.
    on_window: Callable[[int], None] | None = None  # inferences in each window emitted
    # Each model download: (start, last byte; wall clock) and bytes over the wire.
    on_transfer: Callable[[float, float, int], None] | None = None


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
        self.supervisor = Supervisor(log)
        self.faults = Faults.configured(config.faults)
        self.boot = next_boot(config.state_dir)  # signed in reports: ordered across boots
        # The running model and its metadata, one tuple: the API's connection threads
        # read it in one load (`serving`), so a switch stored as one tuple is atomic.
        self._running: tuple[LoadedModel | None, dict[str, Any]] = (None, {})
        self._transport: NatsTransport | None = None
        # Reports wait on disk until JetStream acknowledges them (edge_agent/spool.py).
        self.spool = Spool(config.state_dir / "spool", max_bytes=config.spool_max_bytes,
                           fsync=config.spool_fsync)
        if self.faults.spool_enospc:
            self.spool.write_fault = _raise_enospc("spool write")
        self.reporter = Reporter(self.device_id, self.boot, self.spool, self.device_key,
                                 on_window=config.on_window)
        self.inference_paused = False  # no new inferences (simulators drain their spools)
        self._rng = np.random.default_rng()
        self.installs = 0  # successful switches in this process (tests read it)
        self.download_stats = DownloadStats()
        # Resident memory (KiB) around downloads: a blob must stream, not pile up here.
        self._rss_kib: dict[str, int] = {"at_start": _rss_kib()}
        self._update_task: asyncio.Task[None] | None = None
        self._inflight: proto.Assignment | None = None
        self._rewatch = asyncio.Event()
        self._assignment_watch: KeyUpdates | None = None  # woken on reconnect
        self._stopping = False
        self._reinstall = False  # no usable slot at boot: install the assignment again
        # Freshness (edge_agent.update.check_timestamp): the newest timestamp accepted,
        # an assignment held back for stale authority, the kind of staleness reported.
        self._timestamp_path = config.state_dir / TIMESTAMP_NAME
        self.timestamp_version = self._load_timestamp_version()
        self._held: bytes | None = None
        self._held_wake = asyncio.Event()
        self._stale_reported = ""
        # The watch and the held-back retry both hand assignments in: one at a time, so
        # the same assignment is not judged new twice while the first is still awaiting.
        self._handling = asyncio.Lock()
        self.api: InferenceServer | None = None

    @property
    def model(self) -> LoadedModel | None:
        return self._running[0]

    @model.setter
    def model(self, model: LoadedModel | None) -> None:
        self._running = (model, self._running[1])

    @property
    def model_meta(self) -> dict[str, Any]:
        return self._running[1]

    @model_meta.setter
    def model_meta(self, meta: dict[str, Any]) -> None:
        self._running = (self._running[0], meta)

    @property
    def api_socket(self) -> Path:
        return self.config.api_socket or self.config.state_dir / API_SOCKET_NAME

    @property
    def watching(self) -> bool:
        """True once the agent watches its assignment key (a new one reaches it now)."""
        return self._assignment_watch is not None

    @property
    def trust(self) -> TrustRoot:
        return self.roots.trust

    @property
    def transport(self) -> NatsTransport:
        assert self._transport is not None, "the agent is not running"
        return self._transport

    async def refresh_roots(self) -> None:
        """Walk to the newest published trust root; report a refused one."""
        try:
            refused = await self.roots.refresh(self.transport)
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
                watcher = await self.transport.watch_latest_root()
                try:
                    while not self._stopping:
                        with contextlib.suppress(TimeoutError):
                            if await watcher.updates(timeout=30.0):
                                await self.refresh_roots()
                                self._held_wake.set()  # a held assignment may go now
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

    def _load_timestamp_version(self) -> int:
        """The version of the newest timestamp accepted (it verified when stored)."""
        try:
            data = self._timestamp_path.read_bytes()
        except FileNotFoundError:
            return 0
        try:
            envelope = proto.SignedEnvelope.decode(data, "timestamp")
            return proto.Timestamp.from_map(envelope.document(proto.DOMAIN_TIMESTAMP)).version
        except proto.ProtocolError as exc:
            log.warning("stored timestamp %s unreadable (%s); accepting any version",
                        self._timestamp_path, exc)
            return 0

    def _save_last_counter(self, counter: int) -> None:
        self.last_counter = counter
        atomic_write(self._state_path, json.dumps({"last_counter": counter}).encode())

    def _write_stats(self) -> None:
        """Transfer counters and peak memory, for operators and tests (stats.json)."""
        rss = _rss_kib()
        if "download_max" in self._rss_kib:  # sampled at every download checkpoint
            self._rss_kib["download_max"] = max(self._rss_kib["download_max"], rss)
        stats = {"boot": self.boot, "download": asdict(self.download_stats),
                 "rss_kib": {**self._rss_kib, "now": rss, "peak": _peak_rss_kib()}}
        with contextlib.suppress(OSError):
            atomic_write(self._stats_path, json.dumps(stats).encode())

    def _start_up(self) -> None:
        """Check the installed model's bytes, count this start in an open health window,
        then load the active model.

        Boot integrity: the active slot's file must hash to the digest recorded at
        install and pass the out-of-process preflight before this process maps it (a
        file with flipped bytes used to crash the agent with SIGBUS at every start, or
        run under the release's digest). A missing or bad active slot falls back to the
        previous one (reported `reverted`); with no usable slot the agent reports
        `failed` and installs its current assignment again.
        """
        active = self.slots.active_record()
        if active is None:
            log.info("no model installed yet")
            return
        self.model_meta = dict(active.metadata)
        problem = self._slot_problem(active)
        if problem is not None:
            self._fall_back(f"boot check: {problem}")
            return
        crash_loop = self.health.on_boot(active.metadata.get("digest"))
        if crash_loop is not None:
            log.error("%s", crash_loop)
            if self._revert(crash_loop):
                return
        self._load_active_model()

    def _slot_problem(self, slot: ActiveSlot) -> str | None:
        """Why `slot` cannot run (missing, not its recorded digest, does not load);
        None if it is good."""
        name = f"slot {slot.name} ({slot.metadata.get('model')}/{slot.metadata.get('version')})"
        if not slot.path.is_file():
            return f"{name}: the model file {slot.path} is missing"
        try:
            digest = _file_digest(slot.path)
        except OSError as exc:
            return f"{name}: cannot read {slot.path}: {exc}"
        recorded = str(slot.metadata.get("digest", ""))
        if digest != recorded:
            return (f"{name}: {slot.path} hashes to {digest[:16]}..., not the installed "
                    f"model's {recorded[:16]}... (corrupted on disk)")
        if self.config.isolate_preflight:
            try:
                preflight(slot.path, input_shapes=run_shapes(slot.metadata))
            except ModelRuntimeError as exc:
                return f"{name}: does not load: {exc}"
        return None

    def _fall_back(self, evidence: str) -> None:
        """The active slot failed its boot check: run the previous model if it is good,
        else nothing, and ask for the assignment again."""
        log.error("%s", evidence)
        previous = self.slots.previous()
        if previous is None:
            evidence += "; no previous model to go back to"
        else:
            problem = self._slot_problem(previous)
            if problem is None and self._revert(evidence):
                return
            evidence += f"; the previous model is unusable too: {problem or 'does not load'}"
        self.model = None
        self.health.clear()
        self.slots.forget()
        self._reinstall = True
        reason = f"{evidence}; no usable model: installing the current assignment again"
        log.error("%s", reason)
        self._report_status(proto.STATUS_FAILED, reason=reason,
                            counter=int(self.model_meta.get("counter", self.last_counter)))
        self.model_meta = {}

    def _load_active_model(self) -> None:
        active = self.slots.active()
        if active is None:
            log.info("no model installed yet")
            return
        self.model_meta = dict(active.metadata)
        try:
            if self.faults.load_error and self.faults.applies(self.model_meta):
                raise ModelRuntimeError(f"{active.path}: load failure injected by {FAULTS_ENV}")
            self.model = LoadedModel.load(active.path, mapped=True,
                                          input_shapes=run_shapes(self.model_meta))
            self.model_meta = with_quantization(self.model_meta, self.model)
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

        try:  # until connected, or stopped while still connecting (SIGTERM)
            self._transport = await NatsTransport.connect(
                self.config.nats_url, self.nats_auth(), name=f"edge-agent:{self.device_id}",
                js_domain=self.config.js_domain,
                on_reconnect=on_reconnect, stop=stop,
            )
        except Stopped:
            log.info("stopped before NATS was reached")
            return
        self._report_status(proto.STATUS_STARTED, reason="")
        await self._start_api()
        # Every long-running task under the supervisor: a failure is logged once and the
        # task restarts with backoff; its state is in STATE/tasks.json (`edge-agent
        # status`). A critical task that cannot work for 10 minutes ends the run with
        # `fatal` set, and `edge-agent run` exits 4 so a service manager restarts it.
        sup = self.supervisor
        sup.start("outbox", lambda: self.reporter.send_outbox(
            self.transport, lambda: self._stopping))
        sup.start("watch", self._watch_assignments)
        sup.start("roots", self._watch_roots)
        sup.start("held", self._retry_held)
        sup.start("inference", self._inference_loop)
        sup.start("task-states", self._write_task_states, critical=False)
        try:
            stopped = asyncio.create_task(stop.wait())
            fatal = asyncio.create_task(sup.fatal.wait())
            await asyncio.wait({stopped, fatal}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            fatal.cancel()
        finally:
            log.info("stopping")
            self._stopping = True
            tasks = [self._update_task] if self._update_task is not None else []
            for task in tasks:
                task.cancel()
            # Bounded: a library call that swallows a cancellation (asyncio.wait_for in
            # Python 3.11 can) must not keep the agent from stopping.
            await sup.stop(timeout=3.0)
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=3.0)
                if pending:
                    log.warning("tasks did not stop in time: %s",
                                ", ".join(t.get_name() for t in pending))
            self._save_task_states()
            if self.api is not None:
                await self.api.stop()
            self.emit_window()  # the calls counted since the last window
            await self.reporter.flush(self.transport, timeout=2.0)
            await close_quietly(self.transport, 2.0)
            log.info("stopped")

    @property
    def fatal_reason(self) -> str:
        """Why the agent gave up (a critical task could not work), or ""."""
        return self.supervisor.fatal_reason

    def _save_task_states(self) -> None:
        with contextlib.suppress(OSError):
            atomic_write(self.config.state_dir / TASKS_NAME, json.dumps(
                {"pid": os.getpid(), "tasks": self.supervisor.states()}).encode())

    async def _write_task_states(self) -> None:
        """Keep STATE/tasks.json current for `edge-agent status`, writing on change only
        (a device's flash should not take a write every few seconds)."""
        last: object = None
        while True:
            now = [{k: v for k, v in t.items() if k != "since"}
                   for t in self.supervisor.states()]
            if now != last:
                self._save_task_states()
                last = now
            await asyncio.sleep(TASK_STATES_EVERY_S)

    async def _start_api(self) -> None:
        """Serve the local inference API; without it the agent still installs and reports."""
        if not self.config.serve_api:
            return
        server = InferenceServer(self.api_socket, self.serving, self._count_inference,
                                 before_call=self._inject_call_fault)
        try:
            await server.start()
        except InferenceError as exc:
            log.error("local inference API not available: %s", exc)
            return
        self.api = server

    def serving(self) -> Serving | None:
        """The model that answers calls now (from the API's connection threads). A
        switch stores the model and its metadata as one tuple, so a call sees one
        model, never half a switch."""
        model, meta = self._running
        return None if model is None else Serving(model, meta)

    def nats_auth(self) -> NatsAuth:
        """The device key is the device's NATS identity (an nkey); TLS with the bundle's CA."""
        if self.device_key is None:
            return NatsAuth(ca_file=self.config.nats_ca)
        return NatsAuth.for_device(self.device_id, self.device_key.private_raw(),
                                   self.config.nats_ca)

    async def _watch_assignments(self) -> None:
        while not self._stopping:
            self._rewatch.clear()
            try:
                watcher = await self.transport.watch_assignment(self.device_id)
                self._assignment_watch = watcher
            except NotPublished:
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
                        value = await watcher.updates(timeout=30.0)
                    except TimeoutError:
                        continue
                    if value is None:
                        continue  # a delete/purge
                    await self.handle_assignment(value)
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
        async with self._handling:
            await self._handle_assignment(data)

    async def _handle_assignment(self, data: bytes) -> None:
        await self.refresh_roots()  # an assignment may be signed by a newly rotated key
        try:
            assignment = self._verify_assignment(data)
        except UpdateRefused as exc:
            log.error("update refused: %s", exc)
            self._report_status(proto.STATUS_FAILED, reason=str(exc), assignment=exc.assignment)
            return
        if assignment is None:
            return
        if not await self._fresh_authority(data, assignment):
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

    async def _fresh_authority(self, data: bytes, assignment: proto.Assignment) -> bool:
        """True if a fresh timestamp names the root this device holds; otherwise hold
        `data` back (tried again by _retry_held) and report why, once per kind."""
        try:
            raw = await self.transport.timestamp()
            stamp = update.check_timestamp(self.trust, raw, self.timestamp_version)
        except (StaleAuthority, TransferError) as exc:
            self._held = data
            self._held_wake.set()
            kind = exc.kind if isinstance(exc, StaleAuthority) else "unreachable"
            reason = (f"assignment {assignment.counter} held back: {exc}; the installed "
                      "model keeps running until fresh authority comes")
            if kind == self._stale_reported or not isinstance(exc, StaleAuthority):
                log.debug("%s", reason)  # said already (or only unreachable): retried
                return False
            log.error("%s", reason)
            self._stale_reported = kind
            self._report_status(proto.STATUS_FAILED, reason=reason, assignment=assignment)
            return False
        if stamp is not None and stamp.version > self.timestamp_version:
            assert raw is not None
            atomic_write(self._timestamp_path, raw)
            self.timestamp_version = stamp.version
        if self._held is not None or self._stale_reported:
            log.info("fresh authority again (timestamp %s); going on with assignment %d",
                     stamp.version if stamp is not None else "not required",
                     assignment.counter)
        self._held = None
        self._stale_reported = ""
        return True

    async def _retry_held(self) -> None:
        """An assignment held back for stale authority is tried again with capped
        backoff (sooner when a new root arrives) until fresh authority comes or a newer
        assignment replaces it."""
        attempt = 0
        while not self._stopping:
            if self._held is None:
                attempt = 0
                self._held_wake.clear()
                await self._held_wake.wait()
                continue
            attempt += 1
            self._held_wake.clear()
            delay = backoff_delay(attempt, self.config.retry_base, self.config.retry_cap)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._held_wake.wait(), delay)
            held, self._held = self._held, None
            if held is not None:
                await self.handle_assignment(held)

    def _verify_assignment(self, data: bytes) -> proto.Assignment | None:
        """The assignment if it is authentic, for us and new; None if already handled."""
        inflight = self._inflight.counter if self._inflight is not None else None
        installed = self.model_meta.get("counter") if self.model is not None else None
        # No usable model after a boot check: the last assignment handled is wanted again.
        last = self.last_counter - 1 if self._reinstall and self.model is None else (
            self.last_counter)
        return update.check_assignment(
            self.trust, self.device_id, update.Counters(last, inflight, installed), data,
        )

    async def _apply(self, assignment: proto.Assignment) -> None:
        try:
            await self._install_retrying(assignment)
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

    async def _install_retrying(self, assignment: proto.Assignment) -> None:
        """Install; a transfer failure (network down, partition, timeout) is never the
        update's end: it is retried with capped exponential backoff and jitter until it
        goes through or a newer assignment cancels it, with no new deploy needed."""
        attempt = 0
        reported = ""
        while True:
            try:
                try:
                    await self._install(assignment)
                    return
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise DiskFull(f"the disk is full installing the update: {exc}") from exc
            except (TransferError, DiskFull) as exc:
                attempt += 1
                delay = backoff_delay(attempt, self.config.retry_base, self.config.retry_cap)
                log.warning("update to counter %d failed (%s); retry %d in %.1f s",
                            assignment.counter, exc, attempt, delay)
                if isinstance(exc, DiskFull) and str(exc) != reported:
                    # The current model keeps running; the hub learns why this device
                    # does not move (once per reason, not at every retry).
                    reported = str(exc)
                    self._report_status(proto.STATUS_FAILED, reason=f"{exc}; retrying",
                                        assignment=assignment)
                await asyncio.sleep(delay)

    async def _load_manifest(self, assignment: proto.Assignment) -> proto.ReleaseManifest:
        key = names.manifest_key(assignment.model, assignment.version)
        try:
            raw = await self.transport.manifest(key)
        except NotPublished as exc:  # a missing manifest is refused, not waited for
            raise UpdateRefused(str(exc)) from exc
        return update.check_manifest(self.trust, assignment, raw)

    async def _install(self, assignment: proto.Assignment) -> None:
        manifest = await self._load_manifest(assignment)
        if self.config.require_inclusion:
            # Waits while the release is not witnessed yet; InclusionRefused is an
            # UpdateRefused.
            await wait_for_inclusion(self.transport, lambda: self.trust, assignment)
        meta = {
            "model": manifest.name, "version": manifest.version, "digest": manifest.digest,
            "counter": assignment.counter, "manifest_hash": assignment.manifest_hash,
            "drift_bins": manifest.drift_bins,  # telemetry bins outputs on these edges
            # Dynamic inputs run at these shapes (preflight, load, every later load).
            "input_shapes": manifest.run_shapes(),
        }
        quantization = manifest.tensor_quantization("outputs")
        if quantization:  # (scale, zero_point) of each output the histograms count
            meta["output_quantization"] = [quantization[0][1], quantization[0][2]]
            meta["outputs_quantization"] = [[scale, zp] for _, scale, zp in quantization]
        layout = manifest.drift_layout()
        if len(layout) > 1:  # drift bins of several output tensors
            meta["drift_tensors"] = layout
        if self.faults.install_error and self.faults.applies(meta):
            raise UpdateRefused(f"install failure injected by {FAULTS_ENV}")
        active = self.slots.active()
        if active is not None and active.metadata.get("digest") == manifest.digest and self.model:
            # Same bytes already running: record the new assignment, no download.
            meta = with_quantization(meta, self.model)
            self.slots.activate(active.name, meta)
            self.model_meta = dict(meta)
        else:
            await self._download_and_switch(manifest, meta)
        self._save_last_counter(assignment.counter)
        self._reinstall = False
        self.installs += 1
        probe = self.model.smoke_test() if self.model is not None else np.zeros(0)
        log.info("installed %s/%s (counter %d)", manifest.name, manifest.version,
                 assignment.counter)
        self._report_status(proto.STATUS_APPLIED, reason="", assignment=assignment,
                            # A prefix tells versions apart; a 14,336-value output
                            # (BlazeFace) made the report oversized and refused.
                            probe_output=[float(v) for v in
                                          probe.ravel()[: proto.MAX_PROBE_VALUES]])

    async def _download_and_switch(
        self, manifest: proto.ReleaseManifest, meta: dict[str, Any]
    ) -> None:
        self._check_room(manifest, meta)
        download = ResumableDownload(
            self.slots.slots_dir, self.transport, manifest.digest, manifest.size,
            stats=self.download_stats, on_checkpoint=self._write_stats,
            retries=self.config.fetch_retries, fetch_timeout=self.config.fetch_timeout,
            before_write=self._download_write_fault(meta),
        )
        self._rss_kib["before_download"] = self._rss_kib["download_max"] = _rss_kib()
        wire_before = self.download_stats.bytes_received
        started = time.time()
        try:  # BlobTooLarge and DigestMismatch are UpdateRefused: not retried
            path = await download.run()
        finally:
            self._write_stats()
            got = self.download_stats.bytes_received - wire_before
            if got and self.config.on_transfer is not None:
                self.config.on_transfer(started, download.last_byte_at, got)
        log.info("downloaded %s: %d bytes over the wire for a %d-byte blob",
                 manifest.digest[:16], self.download_stats.bytes_received - wire_before,
                 manifest.size)

        try:
            # In a child process first: a crashing runtime must not take the agent down.
            if self.config.isolate_preflight:
                await asyncio.to_thread(preflight, path, 120.0, run_shapes(meta))
        except ModelRuntimeError as exc:
            download.discard()
            raise UpdateRefused(f"model does not load: {exc}") from exc
        # From here to the switch nothing awaits, so no other update or revert interleaves.
        slot = self.slots.install_inactive(path)
        try:
            loaded = LoadedModel.load(self.slots.slot_path(slot), mapped=True,
                                      input_shapes=run_shapes(meta))
            loaded.smoke_test()
        except ModelRuntimeError as exc:
            raise UpdateRefused(f"model does not load: {exc}") from exc
        meta.update(with_quantization(meta, loaded))
        self.health.start(meta)
        self.slots.activate(slot, meta)
        self._running = (loaded, dict(meta))  # one store: the switch is atomic

    def _check_room(self, manifest: proto.ReleaseManifest, meta: dict[str, Any]) -> None:
        """Refuse (for now: DiskFull is retried later) a download that cannot fit: the
        blob plus a margin for the spool and state files, less what a partial download
        of it already holds."""
        directory = self.slots.slots_dir
        partial = directory / PARTIAL_NAME
        have = partial.stat().st_size if partial.exists() else 0
        if self.faults.disk_free is not None and self.faults.applies(meta):
            free = self.faults.disk_free
        else:
            free = shutil.disk_usage(directory).free
        margin = max(DISK_MARGIN, manifest.size // 10)
        if free + have < manifest.size + margin:
            raise DiskFull(
                f"not enough disk space for {manifest.name}/{manifest.version}: "
                f"{manifest.size} bytes plus a {margin}-byte margin needed, {free + have} "
                f"free in {directory}")

    def _download_write_fault(self, meta: dict[str, Any]) -> Callable[[int, int], None] | None:
        limit = self.faults.download_enospc
        if limit is None or not self.faults.applies(meta):
            return None

        def before_write(offset: int, length: int) -> None:
            if offset + length > limit:
                raise faults_enospc(f"download past {limit} bytes")

        return before_write

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
            loaded = LoadedModel.load(previous.path, mapped=True,
                                      input_shapes=run_shapes(previous.metadata))
            loaded.smoke_test()
        except (ModelRuntimeError, OSError) as exc:
            log.error("cannot revert (%s): the previous model is unusable: %s", evidence, exc)
            self.health.clear()
            return False
        self.slots.revert()
        self.health.clear()
        self._running = (loaded, with_quantization(previous.metadata, loaded))  # atomic
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
        """Close a telemetry window every window_seconds and end a passed health window;
        with synthetic_load, also run the model on generated inputs at inference_hz."""
        synthetic = self.config.synthetic_load and self.config.inference_hz > 0
        period = 1.0 / self.config.inference_hz if synthetic else None
        window_end = time.monotonic() + self.config.window_seconds
        while True:
            if period is not None and self.model is not None and not self.inference_paused:
                self._infer_once(self.model)
            if self.health.expired():
                log.info("health window of %s/%s passed", self.model_meta.get("model"),
                         self.model_meta.get("version"))
                self.health.clear()
            if time.monotonic() >= window_end:
                window_end = time.monotonic() + self.config.window_seconds
                self.emit_window()
            await asyncio.sleep(period if period is not None else self.config.window_seconds)

    def _infer_once(self, model: LoadedModel) -> None:
        """One synthetic inference (generated input), counted like an API call."""
        meta = self.model_meta
        started = time.perf_counter()
        ok = True
        output: NDArray[Any] | list[NDArray[Any]] | None = None
        try:
            self._inject_fault(meta)
            x = model.generated_input(self._rng)  # fits the first input
            # Every output tensor when the model has one input (telemetry histograms
            # each), else the first output of a run on the first input.
            output = model.run_all([x]) if len(model.inputs) == 1 else model.run(x)
        except ModelRuntimeError as exc:
            ok = False
            log.debug("inference failed: %s", exc)
        self._record_inference(meta, (time.perf_counter() - started) * 1000.0, ok, output)

    def _inject_fault(self, meta: Mapping[str, Any]) -> None:
        faults = self.faults
        if faults.error_rate and faults.applies(dict(meta)) and (
            self._rng.random() < faults.error_rate
        ):
            raise ModelRuntimeError(f"inference failure injected by {FAULTS_ENV}")

    def _inject_call_fault(self, serving: Serving) -> None:
        self._inject_fault(serving.meta)

    def _count_inference(self, serving: Serving, latency_ms: float, ok: bool,
                         outputs: list[NDArray[Any]] | None) -> None:
        """An API call that ran the model: counted like a synthetic inference (every
        output tensor goes into the output histograms)."""
        self._record_inference(serving.meta, latency_ms, ok, outputs)

    def _record_inference(self, meta: Mapping[str, Any], latency_ms: float, ok: bool,
                          output: NDArray[Any] | list[NDArray[Any]] | None) -> None:
        """Count one inference of the model `meta` describes in the telemetry window and,
        while that model is being watched, in its health window."""
        meta = dict(meta)
        self.reporter.follow_model(meta)
        faults = self.faults
        if output is not None and faults.output_shift and faults.applies(meta):
            # A shift of the real output: a quantized one is dequantized first (floats
            # are then binned as they are).
            outputs = [output] if isinstance(output, np.ndarray) else output
            quantization = meta.get("outputs_quantization") or [
                meta.get("output_quantization") or (0.0, 0)]
            output = [bins.dequantize(o, *(quantization[t] if t < len(quantization)
                                           else (0.0, 0))) + faults.output_shift
                      for t, o in enumerate(outputs)]
        self.reporter.record(latency_ms, ok, output)
        watching = self.health.watching
        if (watching is not None and watching.digest == meta.get("digest")
                and watching.digest == self.model_meta.get("digest")):
            evidence = self.health.record(ok)
            if evidence is not None:
                self.emit_window()  # the failing model's last window, before the switch
                self._revert(evidence)

    def emit_window(self) -> None:
        """Close the open telemetry window now and spool it (with the API calls the
        server still holds queued for counting)."""
        if self.api is not None:
            self.api.count_pending()
        self.reporter.emit_window()

    def _report_status(
        self,
        event: str,
        reason: str,
        assignment: proto.Assignment | None = None,
        probe_output: list[float] | None = None,
        counter: int | None = None,
    ) -> None:
        self.reporter.status(event, reason, self.model_meta, assignment=assignment,
                             probe_output=probe_output, counter=counter)


def run_shapes(meta: Mapping[str, Any]) -> dict[str, list[int]] | None:
    """The run shapes of the model's inputs recorded from its manifest (None: the
    manifest gave none, an older hub; a static model needs none)."""
    shapes = meta.get("input_shapes")
    return {str(k): [int(d) for d in v] for k, v in shapes.items()} if shapes else None


def with_quantization(meta: Mapping[str, Any], model: LoadedModel) -> dict[str, Any]:
    """`meta` with the (scale, zero_point) of the model's outputs, which telemetry
    dequantizes before binning, when the manifest did not give them (an older hub: the
    file is the one the manifest names by digest, so its own parameters are the same)."""
    out = dict(meta)
    if "output_quantization" not in out:
        scale, zero_point = model.outputs[0].quantization
        out["output_quantization"] = [scale, zero_point]
    if "outputs_quantization" not in out:
        out["outputs_quantization"] = [list(o.quantization) for o in model.outputs]
    return out


def _raise_enospc(what: str) -> Callable[[], None]:
    def fail() -> None:
        raise faults_enospc(what)

    return fail


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds before retry `attempt` (1, 2, ...): exponential, capped, jittered to
    between half and all of it so a fleet that lost the network does not come back in
    one burst."""
    delay = min(cap, base * 2.0 ** min(attempt - 1, 30))
    return random.uniform(delay / 2, delay)


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
