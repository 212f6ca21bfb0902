"""The verb router: a signed operator command in, its answer out.

`Router.handle(verb, data)` checks the command (hub.commands.envelope.open_command: signed
for this hub, by a known, unrevoked operator whose role allows the verb, a fresh time,
an unused nonce), then runs the verb's handler. Nonces survive a restart: an accepted
write's is in the ledger, a read's (and a refused write's) in hub.commands.nonces.
The one unsigned verb, `audience`, answers the hub's origin so a client can learn what
to sign for. A read answers from the state. A write runs its handler
under the writer's lock and appends its events; the side effects it asks for run after
the commit. A slow write (model register / validate) does its slow part first with no
lock held, then re-checks and appends under the lock. A slow write named in
`Verbs.jobs` (model validate) is answered at once with a job id once its checks pass;
its slow part and commit run in a task (hub.commands.jobs), so a long run never meets a
request timeout.

Every capability hands its verbs in as `Verbs` (its `handlers()`); the router refuses a
verb nobody answers. Refusals are `hub.errors.Refused` (and `ProtocolError` from a
document the hub could not read): the NATS edge turns them into `{"ok": false}`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection

from hub.commands.envelope import (
    AUDIENCE_VERB,
    MAX_CLOCK_SKEW_NS,
    CommandRefused,
    Operator,
    VerifiedCommand,
    open_command,
)
from hub.commands.jobs import Job, Jobs
from hub.commands.nonces import SeenNonces
from hub.commands.outcome import (
    CommandError,
    Handler,
    Outcome,
    Read,
    SlowHandler,
    SlowWork,
    Verbs,
)
from hub.commands.writer import LedgerWriter
from hub.governance import state as governance

# How often the seen-nonce table drops what is older than the freshness window.
NONCE_SWEEP_NS = 10 * 10**9


class _NonceLookup:
    """`nonce in lookup`: in the ledger-derived nonce table or among the seen ones."""

    def __init__(self, conn: Connection, seen: SeenNonces) -> None:
        self.conn = conn
        self.seen = seen

    def __contains__(self, nonce: object) -> bool:
        return isinstance(nonce, str) and (governance.nonce_used(self.conn, nonce)
                                           or nonce in self.seen)


class Router:
    def __init__(self, writer: LedgerWriter, verbs: Iterable[Verbs], *, audience: str,
                 clock: Callable[[], int] = time.time_ns, jobs: Jobs | None = None) -> None:
        self.writer = writer
        self.jobs = jobs  # None: job verbs run as ordinary slow writes (answer at the end)
        self.job_verbs: set[str] = set()
        self._job_nonces: set[str] = set()  # of jobs still running: a replay is refused
        self.audience = audience  # the hub's origin: commands must be signed for it
        self.clock = clock
        self.writes: dict[str, Handler] = {}
        self.slow_writes: dict[str, SlowHandler] = {}
        self.reads: dict[str, Read] = {}
        for group in verbs:
            twice = self.verbs & {*group.writes, *group.slow_writes, *group.reads}
            assert not twice, f"verbs registered twice: {sorted(twice)}"
            self.writes.update(group.writes)
            self.slow_writes.update(group.slow_writes)
            self.job_verbs.update(group.jobs)
            self.reads.update(group.reads)
        # Reads append nothing, so their nonces are not in the ledger: they are kept in
        # the hub's database (across restarts), each until its command would be stale.
        self.seen = SeenNonces(writer.store.engine)
        self._swept = 0

    @property
    def verbs(self) -> set[str]:
        return {*self.writes, *self.slow_writes, *self.reads}

    def operators(self, conn: Connection) -> dict[str, Operator]:
        return {
            r["keyid"]: Operator(r["name"], r["keyid"], r["public"], tuple(r["roles"]),
                                 bool(r["revoked"]))
            for r in governance.list_operators(conn)
        }

    def read_nonces(self) -> int:
        """How many nonces outside the ledger are held (bounded by the freshness window)."""
        return len(self.seen)

    def _claim(self, cmd: VerifiedCommand, now: int) -> None:
        """Record the nonce of a command the ledger will not record; refuse a replay
        that got past the check meanwhile (two copies sent at once)."""
        if now - self._swept >= NONCE_SWEEP_NS:
            self._swept = now
            # A command signed more than MAX_CLOCK_SKEW_NS before `now` is refused as
            # stale by open_command, before its nonce is looked at: its nonce can go.
            self.seen.sweep(now - MAX_CLOCK_SKEW_NS)
        if not self.seen.claim(cmd.nonce, cmd.time):
            raise CommandRefused("replayed command: this nonce was already used")

    def _open(self, data: bytes, verb: str, operators: dict[str, Operator], nonces: Any,
              received: int) -> VerifiedCommand:
        return open_command(data, verb, operators, nonces, received, audience=self.audience)

    async def handle(self, verb: str, data: bytes) -> Any:
        """Check and run one signed command; a refusal raises hub.errors.Refused."""
        if verb == AUDIENCE_VERB:  # unsigned: what a client signs its commands for
            return {"audience": self.audience}
        if verb not in self.verbs:
            known = ", ".join(sorted(self.verbs))
            raise CommandError(f"unknown command {verb!r}; known: {known}")
        received = self.clock()  # freshness is judged on arrival, however long it runs
        read = self.reads.get(verb)
        if read is not None:
            cmd = self._open(data, verb, self.writer.read(self.operators), self.seen, received)
            self._claim(cmd, received)
            result = read(cmd)
            return await result if asyncio.iscoroutine(result) else result
        return await self._write(verb, data, received)

    def _claim_refused(self, cmd: VerifiedCommand) -> None:
        """A write its handler refused appends nothing, so no ledger entry names its
        nonce: claim it, or the same signed command could be replayed (within its
        freshness) once the state allows it."""
        self.seen.claim(cmd.nonce, cmd.time)

    async def _write(self, verb: str, data: bytes, received: int) -> Any:
        handler = self.writes.get(verb)
        slow = self.slow_writes.get(verb)
        if slow is not None:
            # Checks first, then the slow part (blobs, the model) with no lock held, so
            # reports and other commands go on meanwhile; `handler` re-checks under it.
            with self.writer.store.engine.connect() as conn:
                cmd = self._open(data, verb, self.operators(conn),
                                 _NonceLookup(conn, self.seen), received)
                try:
                    work = slow(conn, cmd)
                except Exception:
                    self._claim_refused(cmd)
                    raise
            if self.jobs is not None and verb in self.job_verbs:
                return self._start_job(verb, data, received, cmd, work)
            try:
                handler = await work()
            except Exception:
                self._claim_refused(cmd)
                raise
        assert handler is not None
        return await self._commit(verb, data, received, handler)

    def _start_job(self, verb: str, data: bytes, received: int, cmd: VerifiedCommand,
                   work: SlowWork) -> dict[str, Any]:
        """Start the slow part and its commit in a job; answer with its id."""
        assert self.jobs is not None
        if cmd.nonce in self._job_nonces:
            raise CommandRefused("replayed command: this nonce was already used")
        self._job_nonces.add(cmd.nonce)
        body = cmd.body
        subject = f"{body.get('name', '')}/{body.get('version', '')}"

        async def run(job: Job) -> Any:
            try:
                try:
                    handler = await work()
                    job.step(job.progress)  # cancelled meanwhile: nothing is recorded
                except Exception:
                    self._claim_refused(cmd)
                    raise
                return await self._commit(verb, data, received, handler)
            finally:
                self._job_nonces.discard(cmd.nonce)

        job = self.jobs.start(verb, subject, cmd.operator.keyid, run)
        return {"job": job.job, "state": job.state, "verb": verb, "subject": subject}

    async def _commit(self, verb: str, data: bytes, received: int, handler: Handler) -> Any:
        # One writer at a time: state checks and the append see the same state.
        async with self.writer.lock:
            with self.writer.store.engine.connect() as conn:
                # Again under the lock: a twin may have used the nonce, or the operator
                # been revoked, while the slow part ran.
                cmd = self._open(data, verb, self.operators(conn),
                                 _NonceLookup(conn, self.seen), received)
                try:
                    outcome = handler(conn, cmd)
                    if not isinstance(outcome, Outcome):
                        outcome = await outcome
                except Exception:
                    self._claim_refused(cmd)
                    raise
            entries = await self.writer.append(outcome.events)
        for effect in outcome.after_commit:
            await effect()
        result = outcome.result
        if isinstance(result, dict):
            result = {**result, "seq": [e.seq for e in entries]}
        return result
