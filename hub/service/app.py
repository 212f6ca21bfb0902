"""`hub serve`: the NATS service and the only writer of the ledger.

It owns the JetStream layout (DESIGN.md "NATS layout"), answers signed operator
commands on `hub.api.<verb>`, and turns device reports into ledger events. Every
handler refuses bad input with a message and keeps serving; a command's events and
their projection updates commit in one transaction, and side effects that devices
act on (manifests and assignments in KV) are written only after the ledger has
them, so a device never runs something the ledger does not show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from sqlalchemy import Connection, select

from edge_agent import protocol as proto
from edge_agent.protocol.names import (
    API_PREFIX,
    ASSIGNMENTS_BUCKET,
    LEDGER_STREAM,
    MANIFESTS_BUCKET,
    MODELS_BUCKET,
    REPORTS_DURABLE,
    REPORTS_STREAM,
)
from edge_agent.transport.connect import connect as nats_connect
from edge_agent.transport.objects import iter_object_chunks
from hub import events as ev
from hub import fold as proj
from hub.commands.envelope import CommandRefused, Operator, VerifiedCommand, open_command
from hub.commands.handlers import CommandError, Commands, Outcome, SlowWork
from hub.devices.assignment_sync import SyncResult, reconcile_assignments
from hub.devices.reports import REVOKED, NatsUsersSync, check_report_signature, device_history
from hub.home.config import BOOTSTRAP_ADMIN, BOOTSTRAP_ROLES, HubConfig
from hub.keys.commands import KeyCommands, publish_roots, put_root
from hub.keys.witnesses import WitnessCommands
from hub.log.api import LedgerPublishing, start_ledger_publishing
from hub.log.transparency import TransparencyPublisher
from hub.rollouts.commands import AssignmentIssuer, RolloutCommands
from hub.rollouts.controller import RolloutController
from hub.rollouts.reads import read_handlers, whole_number
from hub.telemetry.ingest import TelemetryIngest
from hub.telemetry.metrics import MetricsServer
from ledger.encoding import canonical_encode
from ledger.entry import Entry
from ledger.storage.schema import ENTRIES
from ledger.storage.store import LedgerStore, NewEvent

log = logging.getLogger("hub")

MAX_REQUEST_BYTES = 256 * 1024
# Commands handled at once. Writes still commit one at a time (the write lock); this
# lets reads and short writes answer while a slow one (validation) runs. Past it, the
# subscription waits, and NATS holds the requests.
MAX_CONCURRENT_REQUESTS = 16
# Reports per fetch: each batch costs a head query, a device query and one telemetry
# transaction, so larger batches share them; below the consumer's 1,000 unacked messages.
REPORT_BATCH = 512
# `devices` pages: rows per page at most, and the encoded rows' budget per reply (under
# the 256 KiB a client accepts; a row with a long last error is ~1.5 KiB).
DEVICES_PAGE = 500
DEVICES_REPLY_BYTES = 192 * 1024

Handler = Callable[[Connection, VerifiedCommand], Any]


class HubService:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.store = LedgerStore.open(config.database_url())
        with self.store.engine.begin() as conn:
            proj.create_tables(conn)
        self.commands = Commands(config, self)
        self.keys = KeyCommands(config, self.commands.keyring, self)
        witnesses = WitnessCommands(self.keys)
        self._write_lock = asyncio.Lock()
        self._api_slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._api_tasks: set[asyncio.Task[None]] = set()
        self._read_nonces: set[str] = set()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ledger_publishing: LedgerPublishing | None = None  # checkpoints + ledger.api
        self.transparency: TransparencyPublisher | None = None  # proofs of witnessed releases
        self.refused_reports = 0
        # Device rows for report intake, valid while the ledger head is unchanged.
        self._device_cache: dict[str, dict[str, Any] | None] = {}
        self._device_cache_head: int | None = None
        self._nats_users = NatsUsersSync(config, self.store.engine)
        c = self.commands
        self._writes: dict[str, Handler] = {
            "operator.add": c.operator_add,
            "operator.revoke": c.operator_revoke,
            "model.approve": c.model_approve,
            "model.reject": c.model_reject,
            "model.release": c.model_release,
            "model.deprecate": c.model_deprecate,
            "model.revoke": c.model_revoke,
            "device.enroll": c.device_enroll,
            "device.revoke": c.device_revoke,
            "deploy": self._deploy,
            "keys.rotate": self.keys.rotate,
            "keys.revoke": self.keys.revoke,
            "witness.add": witnesses.add,
            "witness.remove": witnesses.remove,
        }
        # Their slow part runs outside the write lock (see api.SlowWork).
        self._slow_writes: dict[str, Callable[[Connection, VerifiedCommand], SlowWork]] = {
            "model.register": c.model_register,
            "model.validate": c.model_validate,
        }
        self._reads: dict[str, Callable[[VerifiedCommand], Any]] = {
            "status": self._api_status,
            "whoami": lambda cmd: {"name": cmd.operator.name, "keyid": cmd.operator.keyid,
                                   "roles": list(cmd.operator.roles)},
            "models": lambda cmd: self._read(lambda conn: proj.list_releases(
                conn, cmd.body.get("name") if isinstance(cmd.body.get("name"), str) else None)),
            "model.show": self._api_model_show,
            "model.history": self._api_model_history,
            "devices": self._api_devices,
            "operators": lambda cmd: self._read(proj.list_operators),
            "keys": self.keys.show,
            "device.history": lambda cmd: device_history(self.store, cmd.body.get("device")),
        }
        # Targeting, rollouts and telemetry (rollout_*.py, telemetry_ingest.py, metrics.py).
        self.telemetry = TelemetryIngest(self.store.engine)
        issuer = AssignmentIssuer(lambda: self.commands.keyring.signers("director"),
                                  config.assignment_ttl_days)
        self.controller = RolloutController(self, issuer)
        self._writes.update(RolloutCommands(issuer, self._put_assignment).handlers())
        self._reads.update(read_handlers(self))
        self.metrics: MetricsServer | None = None
        self.assignment_sync = SyncResult()  # what start() found missing from KV

    # ------------------------------------------------------------ lifecycle

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "HubService.start() was not called"
        return self._js

    async def start(self) -> None:
        self._bootstrap_admin()
        self._nc = await nats_connect(
            self.config.nats_url, self.config.nats_auth("hub"), name="hub",
            max_reconnect_attempts=-1, reconnect_time_wait=0.5,
        )
        # The NATS users file follows the ledger's devices and operators. After our own
        # connect: a reload resets connections caught mid-handshake, never established
        # ones (and when nothing changed there is no reload at all).
        await self.sync_nats_users()
        self._js = self._nc.jetstream()
        await self._ensure_layout()
        await publish_roots(self.js, self.commands.keyring, self.store)
        await allow_fleet_consumers(self.js)
        # Before serving: a stop between a ledger commit and its KV write left devices
        # without an assignment the ledger says they have (hub/assignment_sync.py).
        try:
            self.assignment_sync = await reconcile_assignments(self.js, self.store.engine)
        except Exception:  # serve anyway; the next start tries again
            log.exception("could not compare KV assignments with the ledger")
        await self._nc.subscribe(API_PREFIX + ">", cb=self._on_api_concurrently)
        self.ledger_publishing = await start_ledger_publishing(
            self.config, self.store, self._nc, self.js)
        # Model transparency: proof bundles of witnessed releases (hub/transparency.py).
        self.transparency = TransparencyPublisher(
            self.store, self.ledger_publishing.checkpointer.checkpoints,
            lambda: self.commands.keyring.root, self.js)
        self.ledger_publishing.api.on_cosigned = self.transparency.sync
        await self.transparency.start()
        self._tasks.append(asyncio.create_task(self._consume_reports(), name="reports"))
        self._tasks.append(asyncio.create_task(self.controller.run(), name="rollouts"))
        if self.config.metrics_port is not None:
            self.metrics = MetricsServer(self, self.config.metrics_port)
            await self.metrics.start()
        log.info("hub serving on %s, ledger %s", self.config.nats_url, self.config.database_url())

    async def stop(self) -> None:
        if self._api_tasks:  # let commands in progress answer (bounded)
            await asyncio.wait(set(self._api_tasks), timeout=10)
        for task in set(self._api_tasks):
            task.cancel()
        if self.ledger_publishing is not None:
            await self.ledger_publishing.stop()  # signs a last checkpoint of what was added
        for task in self._tasks:
            task.cancel()
        # Bounded: a stuck NATS call must not keep the hub from stopping.
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
        self._tasks.clear()
        await self._nats_users.close()
        if self.metrics is not None:
            await self.metrics.stop()
        self.telemetry.flush()
        if self._nc is not None and not self._nc.is_closed:
            # Handlers are done by now; flush what we published and close.
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 5)
        self.store.close()

    def _bootstrap_admin(self) -> None:
        """The first operator comes from `hub init`'s config, recorded once in the ledger."""
        with self.store.engine.connect() as conn:
            if proj.list_operators(conn):
                return
        if not self.config.admin_public:
            log.warning("no operators in the ledger and no admin_public in config.toml")
            return
        public = bytes.fromhex(self.config.admin_public)
        from ledger.signing import PublicKey

        payload = {"name": BOOTSTRAP_ADMIN, "keyid": PublicKey(public).keyid,
                   "public": public, "roles": sorted(BOOTSTRAP_ROLES), "bootstrap": True}
        self.store.append_many(
            [NewEvent(ev.OPERATOR_ADDED, ev.HUB_ACTOR, ev.operator_subject(BOOTSTRAP_ADMIN),
                      payload)],
            apply=proj.apply_entries,
        )

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

    # ------------------------------------------------------------ Effects (for api.py)

    async def read_blob(self, digest: str, size: int, dest: Path) -> str:
        hasher = blake3.blake3()
        with open(dest, "wb") as fh:
            async for chunk in iter_object_chunks(self.js, MODELS_BUCKET, digest, size):
                hasher.update(chunk)
                fh.write(chunk)
        return hasher.hexdigest()

    async def put_manifest(self, key: str, envelope: bytes) -> None:
        await (await self.js.key_value(MANIFESTS_BUCKET)).put(key, envelope)

    async def sync_nats_users(self, wait: bool = True) -> bool:
        """Rewrite the NATS users file from the device table and reload the local server;
        without `wait` only schedule it (returns False)."""
        if not wait:
            self._nats_users.request()
            return False
        return await self._nats_users.sync()

    async def _put_assignment(self, device: str, envelope: bytes) -> None:
        await (await self.js.key_value(ASSIGNMENTS_BUCKET)).put(device, envelope)

    put_assignment = _put_assignment

    async def publish_root(self, data: bytes) -> None:
        await put_root(self.js, data)

    # ------------------------------------------------------------ ledger writes

    async def _append(self, new: list[NewEvent]) -> list[Entry]:
        entries = self.store.append_many(new, apply=proj.apply_entries)
        if self._nc is None or self._js is None:
            return entries  # not serving (offline use): no feed to publish to
        # The feed is a convenience; the DB is truth. Published in order on the hub's one
        # connection (the LEDGER stream stores them in that order, de-duplicated by
        # Nats-Msg-Id) without waiting for each stream ack: waiting made every append
        # hold the write lock for one NATS round trip per entry (a 500-device wave start
        # is 501 entries), and a failed publish was ignored anyway.
        for entry in entries:
            with contextlib.suppress(Exception):
                await self._nc.publish("ledger.entry", entry.body, headers=_entry_headers(entry))
        return entries

    def _read(self, fn: Callable[[Connection], Any]) -> Any:
        with self.store.engine.connect() as conn:
            return fn(conn)

    # ------------------------------------------------------------ operator API

    def _operators(self) -> dict[str, Operator]:
        rows = self._read(proj.list_operators)
        return {
            r["keyid"]: Operator(r["name"], r["keyid"], r["public"], tuple(r["roles"]),
                                 bool(r["revoked"]))
            for r in rows
        }

    async def _on_api_concurrently(self, msg: Msg) -> None:
        # nats-py runs one subscription's callbacks one after another: hand each request
        # to a task of its own so a long command does not hold up the next one.
        await self._api_slots.acquire()
        task = asyncio.create_task(self._on_api(msg), name=f"api {msg.subject}")
        self._api_tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._api_tasks.discard(t)
            self._api_slots.release()

        task.add_done_callback(done)

    async def _on_api(self, msg: Msg) -> None:
        verb = msg.subject[len(API_PREFIX):]
        try:
            if len(msg.data) > MAX_REQUEST_BYTES:
                raise CommandError(f"request is over {MAX_REQUEST_BYTES} bytes")
            if verb not in self._writes and verb not in self._reads \
                    and verb not in self._slow_writes:
                known = ", ".join(sorted([*self._writes, *self._slow_writes, *self._reads]))
                raise CommandError(f"unknown command {verb!r}; known: {known}")
            result = await self._dispatch(verb, msg.data)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except (CommandError, CommandRefused, proto.ProtocolError) as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # keep serving; the operator gets one line
            log.exception("command %s failed", verb)
            reply = {"ok": False, "error": f"internal error in {verb}: {exc}"}
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(canonical_encode(reply))

    async def _dispatch(self, verb: str, data: bytes) -> Any:
        """Check and run one signed command; raises CommandError/CommandRefused."""
        if verb in self._reads:
            cmd = open_command(data, verb, self._operators(), self._read_nonces)
            self._read_nonces.add(cmd.nonce)
            result = self._reads[verb](cmd)
            return await result if asyncio.iscoroutine(result) else result
        handler = self._writes.get(verb)
        received = time.time_ns()  # freshness is judged on arrival, however long it runs
        if verb in self._slow_writes:
            # Checks first, then the slow part (blobs, the model) with no lock held, so
            # reports and other commands go on meanwhile; `handler` re-checks under it.
            with self.store.engine.connect() as conn:
                cmd = open_command(data, verb, self._operators(), _NonceLookup(conn), received)
                work = self._slow_writes[verb](conn, cmd)
            handler = await work()
        if handler is None:
            raise CommandError(f"unknown command {verb!r}")
        # One writer at a time: state checks and the append see the same state.
        async with self._write_lock:
            with self.store.engine.connect() as conn:
                used = _NonceLookup(conn)
                # Again under the lock: a twin may have used the nonce, or the operator
                # been revoked, while the slow part ran.
                cmd = open_command(data, verb, self._operators(), used, received)
                outcome = handler(conn, cmd)
                if asyncio.iscoroutine(outcome):
                    outcome = await outcome
            assert isinstance(outcome, Outcome)
            entries = await self._append(outcome.events)
        for effect in outcome.after_commit:
            await effect()
        result = outcome.result
        if isinstance(result, dict):
            result = {**result, "seq": [e.seq for e in entries]}
        return result

    def _deploy(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        head = self.store.head()
        next_seq = 0 if head is None else head.seq + 1
        return self.commands.deploy(conn, cmd, next_seq, self._put_assignment)

    def _api_status(self, cmd: VerifiedCommand) -> Any:
        head = self.store.head()
        return {
            "entries": 0 if head is None else head.seq + 1,
            "head": "" if head is None else head.hash.hex(),
            "refused_reports": self.refused_reports,
        }

    def _api_devices(self, cmd: VerifiedCommand) -> Any:
        """One page of the fleet (a 1,000-device fleet is over the reply size limit in
        one piece): up to `limit` rows from `offset`, cut short to stay under
        DEVICES_REPLY_BYTES; `next_offset` is where the next page starts (None: done)."""
        body = cmd.body
        state = body.get("state")
        if state is not None and not isinstance(state, str):
            raise CommandError("'state' must be text")
        limit = whole_number(body, "limit", DEVICES_PAGE, 1, DEVICES_PAGE)
        offset = whole_number(body, "offset", 0, 0, None)

        def page(conn: Connection) -> tuple[list[dict[str, Any]], dict[str, int]]:
            return (proj.list_devices(conn, state, offset, limit + 1),
                    proj.device_states(conn))

        rows, states = self._read(page)
        more = len(rows) > limit
        kept: list[dict[str, Any]] = []
        size = 0
        for row in rows[:limit]:
            size += len(canonical_encode(row))
            if kept and size > DEVICES_REPLY_BYTES:
                more = True
                break
            kept.append(row)
        total = states.get(state, 0) if state is not None else sum(states.values())
        return {"devices": kept, "device_count": total, "states": states, "offset": offset,
                "next_offset": offset + len(kept) if more else None}

    def _api_model_show(self, cmd: VerifiedCommand) -> Any:
        name = cmd.body.get("name")
        if not isinstance(name, str):
            raise CommandError("missing 'name'")
        version = cmd.body.get("version")
        rows = self._read(lambda conn: proj.list_releases(conn, name))
        if isinstance(version, str):
            rows = [r for r in rows if r["version"] == version]
        if not rows:
            raise CommandError(f"no model {name}{'/' + version if version else ''} registered")
        return rows

    def _api_model_history(self, cmd: VerifiedCommand) -> Any:
        """Every event about a model, with the operator keys needed to check signatures."""
        name = cmd.body.get("name")
        if not isinstance(name, str) or not name:
            raise CommandError("missing 'name'")
        prefix = f"model:{name}/"
        query = (select(ENTRIES.c.body, ENTRIES.c.prev, ENTRIES.c.hash)
                 .where(ENTRIES.c.subject.startswith(prefix, autoescape=True))
                 .order_by(ENTRIES.c.seq))
        with self.store.engine.connect() as conn:
            rows = conn.execute(query).all()
            operators = proj.list_operators(conn)
        events = []
        for body, prev, hash_ in rows:
            entry = Entry.from_body(body, prev, hash_)
            events.append({"seq": entry.seq, "ts": entry.ts, "kind": entry.kind,
                           "actor": entry.actor, "subject": entry.subject,
                           "payload": entry.payload})
        return {"events": events,
                "operators": [{"name": o["name"], "keyid": o["keyid"], "public": o["public"]}
                              for o in operators]}

    # ------------------------------------------------------------ device reports

    async def _consume_reports(self) -> None:
        sub = await self.js.pull_subscribe(
            "fleet.report.>", durable=REPORTS_DURABLE, stream=REPORTS_STREAM
        )

        async def fetch() -> list[Msg]:
            try:
                return await sub.fetch(REPORT_BATCH, timeout=1.0)
            except TimeoutError:
                return []
            except Exception as exc:  # disconnected: nats-py reconnects; try again shortly
                log.warning("report fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                return []

        # The next batch is requested while this one is processed (one fetch in flight at
        # a time), so the fetch round trip overlaps the hub's work instead of adding to it.
        pending = asyncio.create_task(fetch())
        try:
            while True:
                msgs = await pending
                pending = asyncio.create_task(fetch())
                if msgs:
                    await self._process_reports(msgs)
        finally:
            pending.cancel()

    async def _process_reports(self, msgs: list[Msg]) -> None:
        """One fetched batch: check, store, then acknowledge (see _consume_reports)."""
        batch = _ReportBatch()
        try:
            self._check_device_cache()
            self._load_devices({m.subject.split(".")[2] for m in msgs
                                if m.subject.count(".") == 3})
        except Exception:  # the database is busy or gone: not acknowledged, redelivered
            log.exception("cannot read the devices of a report batch")
            await asyncio.sleep(0.5)
            return
        for msg in msgs:
            try:
                self._prepare_report(msg.subject, msg.data, batch)
            except proto.ProtocolError as exc:
                self.refused_reports += 1
                log.warning("refused report on %s: %s", msg.subject, exc)
            except Exception:
                # One poisonous report must never stop intake for the whole fleet.
                self.refused_reports += 1
                log.exception("report on %s could not be processed", msg.subject)
        try:
            await self._commit_reports(batch)
        except Exception:
            log.exception("status reports could not be stored; redelivered later")
            return  # not acknowledged: JetStream redelivers them
        # Acknowledge only once the batch's telemetry is stored: counted exactly once.
        self.telemetry.flush()
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.ack()

    async def _handle_report(self, subject: str, data: bytes) -> None:
        """One report on its own (the consumer above handles a fetched batch at once)."""
        batch = _ReportBatch()
        self._check_device_cache()
        self._prepare_report(subject, data, batch)
        await self._commit_reports(batch)

    def _check_device_cache(self) -> None:
        """Drop the cached device rows if the ledger moved (an enrolment, a revocation,
        a status report...): one head query per fetched batch instead of one device
        query per telemetry window."""
        with self.store.engine.connect() as conn:
            head = conn.exec_driver_sql("SELECT max(seq) FROM ledger_entries").scalar()
        if head != self._device_cache_head:
            self._device_cache.clear()
            self._device_cache_head = head

    def _load_devices(self, devices: set[str]) -> None:
        """The rows of a fetched batch's devices in one query. During a rollout every
        batch moves the ledger head (status reports), so the cache above is cold for
        each batch, and one query per report was the hub's largest intake cost."""
        missing = sorted(d for d in devices if d not in self._device_cache)
        if not missing:
            return
        rows = self._read(lambda conn: proj.get_devices(conn, missing))
        for device in missing:
            self._device_cache[device] = rows.get(device)

    def _device(self, device: str) -> dict[str, Any] | None:
        if device in self._device_cache:
            return self._device_cache[device]
        row: dict[str, Any] | None = self._read(lambda conn: proj.get_device(conn, device))
        self._device_cache[device] = row
        return row

    def _prepare_report(self, subject: str, data: bytes, batch: _ReportBatch) -> None:
        """Check one report; count a telemetry window, or add a status report's ledger
        event and last-seen time to `batch` (stored by _commit_reports)."""
        parts = subject.split(".")
        if len(parts) != 4:
            raise proto.ProtocolError(f"unexpected report subject {subject}")
        report, envelope = proto.read_report(data)
        if report.device != parts[2]:
            raise proto.ProtocolError(
                f"report for device {report.device} arrived on {parts[2]}'s subject"
            )
        device = self._device(report.device)
        if device is None:
            raise proto.ProtocolError(f"report from unknown device {report.device}")
        if device["state"] == REVOKED:
            raise proto.ProtocolError(f"report from revoked device {report.device}")
        if isinstance(report, proto.TelemetryWindow):
            self.telemetry.offer(report)
            return
        check_report_signature(device, envelope)  # refused unless the device's key signed it
        batch.seen[report.device] = max(report.ts, batch.seen.get(report.device, report.ts))
        if report.event == proto.STATUS_STARTED:
            return
        last_boot, last_seq = batch.last.get(
            report.device, (device["last_report_boot"], device["last_report_seq"]))
        if last_boot == report.boot and last_seq is not None and last_seq >= report.seq:
            return  # already in the ledger (a redelivery after a hub restart)
        batch.last[report.device] = (report.boot, report.seq)
        common = {
            "device": report.device, "model": report.model, "version": report.version,
            "digest": report.digest, "counter": report.counter, "boot": report.boot,
            "report_seq": report.seq, "report": data,
        }
        if report.event == proto.STATUS_APPLIED:
            kind = ev.DEVICE_UPDATE_APPLIED
            payload = {**common, "probe_output": [float(v) for v in report.probe_output]}
        elif report.event == proto.STATUS_REVERTED:
            kind = ev.DEVICE_UPDATE_REVERTED
            payload = {**common, "reason": report.reason}
        else:
            kind = ev.DEVICE_UPDATE_FAILED
            payload = {**common, "reason": report.reason}
        batch.events.append(
            NewEvent(kind, report.device, ev.device_subject(report.device), payload))

    async def _commit_reports(self, batch: _ReportBatch) -> None:
        """A batch's last-seen times in one transaction, its ledger events in another
        (group commit: one fsync for the batch, not one per report)."""
        if batch.seen:
            self._touch_many(batch.seen)
        if not batch.events:
            return
        async with self._write_lock:
            try:
                await self._append(batch.events)
                return
            except Exception:
                if len(batch.events) == 1:
                    raise
                log.warning("a batch of %d status reports failed; appending them one by one",
                            len(batch.events))
            for event in batch.events:  # so one bad event does not hold up the others
                try:
                    await self._append([event])
                except Exception:
                    self.refused_reports += 1
                    log.exception("status report of %s could not be stored", event.subject)

    def _touch_many(self, seen: dict[str, int]) -> None:
        table = proj.TELEMETRY
        with self.store.engine.begin() as conn:
            rows = {r.device: r.last_seen for r in conn.execute(
                select(table.c.device, table.c.last_seen).where(table.c.device.in_(list(seen))))}
            for device, ts in seen.items():
                if device not in rows:
                    conn.execute(table.insert().values(device=device, last_seen=ts))
                elif ts > (rows[device] or 0):
                    conn.execute(table.update().where(table.c.device == device)
                                 .values(last_seen=ts))


@dataclass
class _ReportBatch:
    """What one fetched batch of reports writes: ledger events and last-seen times."""

    events: list[NewEvent] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)  # device -> newest report ts
    last: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)


# Every device holds a watch consumer on the assignments and trust-root buckets, plus one
# per model download; nats-server (2.11+) caps a stream at 1,000 consumers unless the
# stream says otherwise (err 10026 "maximum consumers limit reached").
FLEET_MAX_CONSUMERS = 1_000_000


async def allow_fleet_consumers(js: JetStreamContext) -> None:
    """Raise max_consumers on the buckets every device reads (idempotent)."""
    from edge_agent.protocol.names import ROOTS_BUCKET

    buckets = (f"KV_{ASSIGNMENTS_BUCKET}", f"KV_{MANIFESTS_BUCKET}", f"KV_{ROOTS_BUCKET}",
               f"OBJ_{MODELS_BUCKET}")
    for stream in buckets:
        try:
            info = await js.stream_info(stream)
            if info.config.max_consumers == FLEET_MAX_CONSUMERS:
                continue
            info.config.max_consumers = FLEET_MAX_CONSUMERS
            await js.update_stream(info.config)
        except Exception as exc:  # a server that refuses: devices beyond 1,000 may not watch
            log.warning("cannot raise max_consumers on %s: %s", stream, exc)


class _NonceLookup:
    """`nonce in lookup` against the ledger-derived nonce table."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __contains__(self, nonce: object) -> bool:
        return isinstance(nonce, str) and proj.nonce_used(self.conn, nonce)


def _entry_headers(entry: Entry) -> dict[str, str]:
    return {"Nats-Msg-Id": f"ledger.{entry.seq}", "Ledger-Seq": str(entry.seq),
            "Ledger-Hash": entry.hash.hex(), "Ledger-Prev": entry.prev.hex()}

