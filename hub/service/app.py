"""`hub serve`: the composition root of the hub, the only writer of the ledger.

It builds the parts and starts them in order: the ledger store and the hub's state
tables (hub.fold), the single writer (hub.commands.writer), every capability's verbs
behind one router (hub.commands.router), the NATS edge that serves them and carries out
their side effects (hub.service.nats), report intake (hub.devices.reports), the rollout
controller, the public ledger API and checkpoints (hub.log), the metrics page and the
read-only dashboard (hub.web).

Every handler refuses bad input with a message and keeps serving; a command's events and
their state updates commit in one transaction, and side effects that devices act on
(manifests and assignments in KV) are written only after the ledger has them, so a
device never runs something the ledger does not show.

Several `hub serve` processes may share one PostgreSQL (and one NATS): every process
serves operator commands, reads and the public ledger API; one of them, the leader
(hub.commands.leadership), also runs report intake, the rollout controller,
reconciliation and the checkpointer. On SQLite one process serves: a second one is
refused at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from hub import fold
from hub.clock import Clock, SystemClock, clock_skew
from hub.commands.envelope import VerifiedCommand
from hub.commands.jobs import Jobs
from hub.commands.leadership import (
    Leadership,
    Lease,
    SingleProcessLock,
    limit_stalled_transactions,
)
from hub.commands.outcome import Effects, Verbs
from hub.commands.router import Router
from hub.commands.writer import LedgerWriter
from hub.devices.assignment_sync import SyncResult, reconcile_assignments
from hub.devices.assignments import AssignmentIssuer
from hub.devices.deploy import DeployCommands
from hub.devices.enrolment import EnrolmentCommands
from hub.devices.reads import DeviceReads
from hub.devices.reports import REFUSAL_REASONS, ReportIntake, ensure_report_consumers
from hub.devices.tokens import TokenCommands, TokenEnrolment
from hub.governance.models import ModelCommands
from hub.governance.operators import OperatorCommands, bootstrap_admin
from hub.governance.reads import GovernanceReads
from hub.home.config import HubConfig, parse_listen
from hub.home.replies import REASONS as REPLY_REFUSAL_REASONS
from hub.keys.commands import KeyCommands, RootChanges
from hub.keys.keyring import Keyring
from hub.keys.roots import publish_roots
from hub.keys.timestamps import TimestampPublisher
from hub.keys.witnesses import WitnessCommands
from hub.log.api import LedgerPublishing, start_ledger_publishing
from hub.log.checkpointer import WITNESSES_NAME
from hub.log.transparency import TransparencyPublisher
from hub.rollouts.commands import RolloutCommands
from hub.rollouts.controller import RolloutController
from hub.rollouts.reads import RolloutReads
from hub.rollouts.rebase import RebaseCommands
from hub.service.nats import CONNECT_FOR_S, NatsEdge, allow_fleet_consumers
from hub.service.reconcile import Reconciler
from hub.service.status import fleet_status
from hub.telemetry.ingest import TelemetryIngest
from hub.telemetry.metrics import HubMetrics, MetricSources, MetricsServer
from hub.web.data import DashboardSources
from ledger.storage.checkpoint_store import CheckpointStore
from ledger.storage.store import LedgerStore
from ledger.supervisor import Supervisor

if TYPE_CHECKING:
    from hub.web.app import DashboardServer

log = logging.getLogger("hub")


class HubService:
    """The hub's parts, built from its config; `start()` serves, `stop()` stops.

    `effects` replaces the NATS edge's side effects (blob reads, KV writes, the users
    file) for a hub that runs offline (tests); such a hub is driven through `router`."""

    def __init__(self, config: HubConfig, effects: Effects | None = None,
                 clock: Clock | None = None) -> None:
        self.config = config
        # Wall and monotonic time for deadlines and expiries; tests inject a skewed one.
        self.clock: Clock = clock or SystemClock()
        # A new ledger gets the configured tree hash; an existing one keeps its own.
        self.store = LedgerStore.open(config.database_url(), tree_hash=config.tree_hash)
        with self.store.engine.begin() as conn:
            fold.create_tables(conn)
        self.writer = LedgerWriter(self.store, config.leader_lease_seconds)
        # Who leads: a lease in PostgreSQL; on SQLite this process alone, always.
        postgres = self.store.engine.dialect.name == "postgresql"
        lease = Lease(self.store.engine, config.leader_lease_seconds) if postgres else None
        if postgres:
            limit_stalled_transactions(self.store.engine)
        self.leadership = Leadership(lease, self._lead, self._follow)
        self.writer.leadership = self.leadership
        self._single: SingleProcessLock | None = None  # SQLite: held while serving
        self._first_lead = True  # the lead taken at start reconciles before serving
        self.edge = NatsEdge(config, self.store.engine)
        self.effects: Effects = effects if effects is not None else self.edge
        # Signing keys come from the keyring: after `hub keys rotate` the new key signs.
        self.keyring = Keyring(config)
        # Every process counts telemetry (the shared intake); the counts are the
        # database's, so no fence: see hub.telemetry.ingest.
        self.telemetry = TelemetryIngest(self.store.engine)
        self.reports = ReportIntake(self.writer, self.telemetry)
        issuer = AssignmentIssuer(lambda: self.keyring.signers("director"),
                                  config.assignment_ttl_s, self.clock.wall_ns)
        roots = RootChanges(config, self.keyring, self.effects)
        # The short-lived signed timestamp devices need before installing anything new
        # (hub/keys/timestamps.py): re-signed at once when a new root is published.
        self.timestamps = TimestampPublisher(
            self.keyring, lambda: self.edge.js, self.clock, config.timestamp_ttl_seconds,
            config.home)
        if effects is None:  # a hub without NATS publishes no timestamp
            roots.after_publish = self.timestamps.root_changed
        engine = self.store.engine
        witnesses = WitnessCommands(roots)
        # Validation jobs (hub/commands/jobs.py); the ones a previous run left running
        # are marked failed ("hub restarted") now.
        self.jobs = Jobs(engine)
        self.router = Router(self.writer, [
            OperatorCommands(self.effects).handlers(),
            ModelCommands(config, self.keyring, self.effects, engine,
                          self.jobs).handlers(),
            GovernanceReads(engine).handlers(),
            EnrolmentCommands(config, self.effects).handlers(),
            TokenCommands(config, self.clock.wall_ns).handlers(),
            DeployCommands(issuer, self.effects).handlers(),
            DeviceReads(engine).handlers(),
            KeyCommands(roots, issuer, witnesses.imported).handlers(),
            witnesses.handlers(),
            RolloutCommands(issuer, self.effects).handlers(),
            RolloutReads(engine, self.telemetry).handlers(),
            RebaseCommands(self.telemetry).handlers(),
            Verbs(reads={"status": self._status}),
        ], audience=config.origin, jobs=self.jobs)
        # Devices that made their own key enrol with a one-time token (`hub.enrol`).
        self.enrolment = TokenEnrolment(config, self.writer, self.effects,
                                        lambda: self.clock.wall_ns())
        # KV follows the ledger continuously: writes left undone are retried until they
        # land, deleted keys are put back, assignments renewed before they expire.
        self.reconciler = Reconciler(
            self.writer, issuer, self.keyring, lambda: self.edge.js,
            self.effects.put_assignment, self.clock, config.reconcile_every_seconds,
            reconnects=self._reconnects, timestamp=self.timestamps.restore)
        self.controller = RolloutController(
            self.writer, self.telemetry, issuer, self.effects.put_assignment,
            kv_give_up_s=config.kv_write_give_up_seconds,
            on_writes_left=lambda _: self.reconciler.nudge(), clock=self.clock)
        # Every long-running task of the hub runs under it: a failure is logged once,
        # the task restarts with backoff, `status` and the metrics show each task's
        # state; a critical task that cannot work at all sets `supervisor.fatal`, and
        # `hub serve` then exits non-zero (docs/OPERATIONS.md "Supervision").
        self.supervisor = Supervisor(log)
        self.ledger_publishing: LedgerPublishing | None = None  # checkpoints + ledger.api
        self.transparency: TransparencyPublisher | None = None  # proofs of witnessed releases
        # Prometheus: this hub's own registry, read from its state at scrape time.
        self.metrics = HubMetrics(MetricSources(
            store=self.store, telemetry=self.telemetry,
            reports_accepted=lambda: self.reports.accepted_by_kind,
            reports_refused=lambda: self.reports.refused_by_reason,
            refusal_reasons=REFUSAL_REASONS,
            replies_refused=lambda: self.edge.replies.counts,
            reply_reasons=REPLY_REFUSAL_REASONS, tasks=self.supervisor.states))
        self.writer.on_append = self.metrics.observe_append
        self.metrics_server: MetricsServer | None = None  # serving while started
        self.dashboard: DashboardServer | None = None  # `--web`: serving while started
        self.assignment_sync = SyncResult()  # what start() found missing from KV
        self.clock_behind_ns = 0  # see check_clock

    async def bootstrap_admin(self) -> bool:
        """Record the first admin from config.toml if the ledger has no operator yet."""
        return await bootstrap_admin(self.config, self.writer)

    def render_metrics(self) -> str:
        """The Prometheus page of the hub's state now (as `GET /metrics` serves it)."""
        return self.metrics.render()

    def check_clock(self) -> int:
        """How far this hub's wall clock is behind the ledger's newest entry (beyond
        CLOCK_SKEW_NS; 0 otherwise): such a clock is surely wrong. Logged, and shown in
        `status` (`clock_behind_s`); bakes and deadlines do not trust it (hub/clock.py)."""
        head = self.store.head()
        self.clock_behind_ns = clock_skew(self.clock.wall_ns(), head.ts if head else None)
        if self.clock_behind_ns:
            log.warning("this hub's clock is %.0f s behind the ledger's newest entry; "
                        "check its time source (bakes and deadlines run on elapsed time)",
                        self.clock_behind_ns / 1e9)
        return self.clock_behind_ns

    async def start(self, stop: asyncio.Event | None = None,
                    connect_for: float | None = CONNECT_FOR_S) -> None:
        """Connect (for `connect_for` seconds at most, `Stopped` if `stop` is set while
        connecting) and serve."""
        if self.store.url is not None and self.leadership.lease is None:
            # SQLite: one `hub serve` per ledger (its lock would serialise several
            # anyway, and nothing else would fence them); PostgreSQL runs several.
            self._single = SingleProcessLock.take(self.store.location)
        self.check_clock()
        await self.bootstrap_admin()
        edge = self.edge
        await edge.connect(stop=stop, give_up_after=connect_for)
        self.writer.publish = edge.publish
        # The NATS users file follows the ledger's devices and operators. After our own
        # connect: a reload resets connections caught mid-handshake, never established
        # ones (and when nothing changed there is no reload at all).
        await edge.sync_nats_users()
        await edge.ensure_layout()
        await publish_roots(edge.js, self.keyring, self.store, self.config.nats_replicas)
        await self.timestamps.restore()  # signed now if due, else put back if KV differs
        await allow_fleet_consumers(edge.js, self.config.nats_replicas)
        await ensure_report_consumers(edge.js)
        # The lease, if it is free (a standby keeps trying under the supervisor below).
        if await self.leadership.begin():
            # Before serving: a stop between a ledger commit and its KV write left devices
            # without an assignment the ledger says they have (hub.devices.assignment_sync).
            await self._sync_assignments()
        await edge.serve_api(self.router)
        await edge.serve_enrolment(self.enrolment.handle)
        assert edge.nc is not None
        self.ledger_publishing = await start_ledger_publishing(
            self.config, self.store, edge.nc, edge.js, edge.replies)
        checkpointer = self.ledger_publishing.checkpointer
        checkpointer.may_sign = self.leadership.leads
        # Model transparency: proof bundles of witnessed releases (hub.log.transparency).
        self.transparency = TransparencyPublisher(
            self.store, checkpointer.checkpoints, lambda: self.keyring.root, edge.js,
            self.config.nats_replicas)
        self.ledger_publishing.api.on_cosigned = self.transparency.sync
        await self.transparency.start()
        transparency = self.transparency

        async def bundles(republish: bool) -> int:
            if republish:  # the bucket changed behind our back: put every bundle again
                transparency.published.clear()
            return await transparency.sync()

        self.reconciler.transparency = bundles
        await checkpointer.hand_over()
        # The shared report intake (telemetry) runs on every process; the leader's work
        # (status intake, rollouts, reconcile, checkpoints) starts and stops with the
        # lease: `_lead` and `_follow`.
        js = edge.js
        self.supervisor.start("intake", lambda: self.reports.consume(js))
        self.supervisor.start("leadership", self.leadership.run)
        if self.config.metrics_listen is not None:
            host, port = parse_listen(self.config.metrics_listen)
            self.metrics_server = MetricsServer(self.metrics.registry, host, port)
            await self.metrics_server.start()  # a port in use fails the start, not later
            self.supervisor.start("metrics", self.metrics_server.run, critical=False)
        if self.config.web_listen is not None:
            # Here, not at the top: a hub without --web loads no Starlette or uvicorn.
            from hub.web.app import DashboardServer, create_app

            host, port = parse_listen(self.config.web_listen)
            token = self.config.web_token
            self.dashboard = DashboardServer(
                create_app(self.dashboard_sources(), token), host, port, token)
            await self.dashboard.start()  # a port in use fails the start, not later
            # Not critical: the hub serves devices and operators without its pictures.
            self.supervisor.start("dashboard", self.dashboard.run, critical=False)
        log.info("hub serving on %s, ledger %s (%s)", self.config.nats_url,
                 self.config.database_url(), self.leadership.role)

    async def _sync_assignments(self) -> None:
        try:
            self.assignment_sync = await reconcile_assignments(self.edge.js, self.store.engine)
        except Exception:  # serve anyway; the next start (or leader) tries again
            log.exception("could not compare KV assignments with the ledger")

    async def _lead(self, epoch: int) -> None:
        """This process became the leader: start the work only a leader does."""
        if self._first_lead:
            self._first_lead = False
        else:  # taken over: the previous leader may have stopped between ledger and KV
            await self._sync_assignments()
        js = self.edge.js
        publishing = self.ledger_publishing
        assert publishing is not None
        for name, run in (("reports", lambda: self.reports.consume_status(js)),
                          ("rollouts", self.controller.run),
                          ("reconcile", self.reconciler.run),
                          ("checkpointer", publishing.checkpointer.run),
                          ("timestamp", self.timestamps.run)):
            await self.supervisor.stop_task(name)  # a second lead (restarted loop)
            self.supervisor.start(name, run)

    async def _follow(self) -> None:
        """This process stopped leading: stop the leader's work. Status reports fetched
        and not stored stay unacknowledged and go to the leader after their ack wait;
        telemetry intake goes on."""
        for name in ("reports", "rollouts", "reconcile", "checkpointer", "timestamp"):
            await self.supervisor.stop_task(name)

    async def stop(self) -> None:
        await self.edge.drain_api()
        await self.jobs.stop()  # running validations fail ("the hub stopped while it ran")
        if self.ledger_publishing is not None:
            await self.ledger_publishing.stop()  # signs a last checkpoint of what was added
        # Bounded: a stuck NATS call must not keep the hub from stopping.
        await self.supervisor.stop(timeout=5)
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.dashboard is not None:
            await self.dashboard.stop()
        with contextlib.suppress(Exception):  # counted again when redelivered
            self.telemetry.flush()
        self.writer.publish = None
        await self.edge.close()
        self.writer.lock.close()
        self.store.close()
        if self._single is not None:
            self._single.release()
            self._single = None

    def _reconnects(self) -> int:
        nc = self.edge.nc
        return 0 if nc is None else int(nc.stats.get("reconnects", 0))

    def dashboard_sources(self) -> DashboardSources:
        """What the dashboard reads: this hub's store, telemetry and status."""
        def checkpoints() -> CheckpointStore | None:
            publishing = self.ledger_publishing
            return publishing.checkpointer.checkpoints if publishing is not None else None

        return DashboardSources(store=self.store, telemetry=self.telemetry,
                                status=self.status_map, checkpoints=checkpoints,
                                home=self.config.home)

    def _status(self, cmd: VerifiedCommand) -> Any:
        return self.status_map()

    def intake_status(self) -> dict[str, Any]:
        """Report intake: this process's share and the totals of every process."""
        t = self.telemetry
        return {"windows_total": t.windows_total, "duplicates_total": t.duplicates_total,
                "this_process": {"windows_counted": t.counted_here,
                                 "windows_raced": t.raced_here,
                                 "accepted_by_kind": dict(self.reports.accepted_by_kind),
                                 "refused": self.reports.refused}}

    def status_map(self) -> dict[str, Any]:
        """The `status` read verb's answer (`hub status`; the dashboard's overview)."""
        head = self.store.head()
        publishing = self.ledger_publishing
        fleet = fleet_status(
            self.store.engine,
            publishing.checkpointer.checkpoints if publishing is not None else None,
            self.config.home / WITNESSES_NAME,
            lambda: self.edge.nc is not None and self.edge.nc.is_connected)
        return {
            **fleet,
            "entries": 0 if head is None else head.seq + 1,
            "head": "" if head is None else head.hash.hex(),
            # Refusals and accepted reports are this process's (each process refuses
            # what it fetched); the telemetry totals are every process's (the database).
            "refused_reports": self.reports.refused,
            "refused_by_reason": dict(self.reports.refused_by_reason),
            "intake": self.intake_status(),
            "tasks": self.supervisor.states(),
            # Requests dropped because of their reply subject (hub/home/replies.py).
            "refused_replies": dict(self.edge.replies.counts),
            # Operator uploads refused, by reason (hub/uploads.py).
            "refused_uploads": dict(self.edge.uploads.refused),
            # Enrolment requests refused (bad, expired, used tokens, ...), per reason.
            "refused_enrolments": dict(self.enrolment.refused),
            "clock_behind_s": self.clock_behind_ns / 1e9,
            # Which process leads (host, pid, epoch), this one's role, every process.
            "leadership": self.leadership.status(),
        }
