"""Long commands as jobs: the hub answers at once with a job id, does the slow part in the
background, and commits (or not) when it ends; the operator polls the job's status.

A job is a slow write (hub.commands.outcome.SlowWork) the router starts in a task instead
of awaiting (`Verbs.jobs`): its checks ran before the answer, its commit runs under the
write lock like any write's. While it runs, its slow part reports progress and meets
cancellation through `current()` (a context variable, so the thread the model runs in sees
it too): `Job.step(fraction)` records progress and raises `JobCancelled` once a cancel was
asked, so a cancelled job stops at its next step and records nothing.

Job status lives in memory (progress) and in the table `hub_jobs` (not a ledger
projection: jobs are not part of the state `hub rebuild` recomputes), so it is still
there after the job's process ends. A hub that starts marks the jobs it finds queued or
running as failed ("hub restarted"): their task died with the process that ran them.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)

from hub.errors import Refused

QUEUED: Final = "queued"
RUNNING: Final = "running"
DONE: Final = "done"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
STATES: Final = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
ENDED: Final = frozenset({DONE, FAILED, CANCELLED})
RESTARTED: Final = "hub restarted"
# Ended jobs kept in memory beyond this are dropped (oldest first); their rows stay.
MAX_ENDED_IN_MEMORY: Final = 256

_METADATA = MetaData()
JOBS: Final = Table(
    "hub_jobs", _METADATA,
    Column("job", String(40), primary_key=True),
    Column("verb", String(64), nullable=False),
    Column("subject", String(256), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Column("started_ns", BigInteger, nullable=False),
    Column("ended_ns", BigInteger, nullable=True),
    Column("error", Text, nullable=False, default=""),
    Column("result", Text, nullable=False, default="null"),  # JSON
)


class JobCancelled(Exception):
    """Raised at a job's next step once its cancellation was asked."""


class JobRefused(Refused):
    """A status or cancel request the hub cannot honour (unknown job, ended already)."""


@dataclass
class Job:
    job: str
    verb: str
    subject: str
    actor: str
    started_ns: int
    state: str = QUEUED
    progress: float = 0.0
    ended_ns: int | None = None
    error: str = ""
    result: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def step(self, fraction: float) -> None:
        """Record progress (0..1, never backwards) and stop here if cancelled."""
        if self.cancel.is_set():
            raise JobCancelled(self.job)
        self.progress = max(self.progress, min(1.0, max(0.0, float(fraction))))

    def status(self, now_ns: int) -> dict[str, Any]:
        end = self.ended_ns if self.ended_ns is not None else now_ns
        out: dict[str, Any] = {
            "job": self.job, "verb": self.verb, "subject": self.subject, "actor": self.actor,
            "state": self.state, "progress": round(self.progress, 4),
            "elapsed_s": round(max(0, end - self.started_ns) / 1e9, 3),
            "started_ns": self.started_ns, "ended_ns": self.ended_ns,
        }
        if self.error:
            out["error"] = self.error
        if self.state == DONE:
            out["result"] = self.result
        return out


_CURRENT: contextvars.ContextVar[Job | None] = contextvars.ContextVar("hub_job", default=None)


def current() -> Job | None:
    """The job the calling code runs in (None outside a job: a direct call)."""
    return _CURRENT.get()


def step(fraction: float) -> None:
    """`Job.step` of the current job; nothing outside a job."""
    job = _CURRENT.get()
    if job is not None:
        job.step(fraction)


class Jobs:
    """The jobs of this hub process, with their rows in `hub_jobs`."""

    def __init__(self, engine: Engine, clock: Callable[[], int] = time.time_ns) -> None:
        self.engine = engine
        self.clock = clock
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        with engine.begin() as conn:
            JOBS.create(conn, checkfirst=True)
            # Their tasks died with the process that ran them.
            conn.execute(update(JOBS).where(JOBS.c.state.in_([QUEUED, RUNNING])).values(
                state=FAILED, error=RESTARTED, ended_ns=clock()))

    def start(self, verb: str, subject: str, actor: str,
              run: Callable[[Job], Awaitable[Any]]) -> Job:
        """Record a queued job and run `run(job)` in a task; answers at once."""
        job = Job("job-" + secrets.token_hex(8), verb, subject, actor, self.clock())
        ended = [j for j, known in self._jobs.items() if known.state in ENDED]
        for old in ended[: max(0, len(ended) - MAX_ENDED_IN_MEMORY)]:  # insertion order
            del self._jobs[old]  # status still answered from its row
        self._jobs[job.job] = job
        with self.engine.begin() as conn:
            conn.execute(insert(JOBS).values(
                job=job.job, verb=verb, subject=subject, actor=actor, state=QUEUED,
                progress=0.0, started_ns=job.started_ns, error="", result="null"))
        task = asyncio.get_running_loop().create_task(self._run(job, run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job, run: Callable[[Job], Awaitable[Any]]) -> None:
        _CURRENT.set(job)  # this task's own context: seen by to_thread calls inside it
        self._save(job, RUNNING)
        try:
            job.result = await run(job)
        except JobCancelled:
            self._end(job, CANCELLED, "cancelled by an operator")
        except asyncio.CancelledError:
            self._end(job, FAILED, "the hub stopped while it ran")
            raise
        except Exception as exc:  # a refusal or an error: the operator reads it as is
            self._end(job, FAILED, str(exc) or type(exc).__name__)
        else:
            job.progress = 1.0
            self._end(job, DONE, "")

    def _end(self, job: Job, state: str, error: str) -> None:
        job.ended_ns = self.clock()
        job.error = error
        self._save(job, state)

    def _save(self, job: Job, state: str) -> None:
        job.state = state
        try:
            with self.engine.begin() as conn:
                conn.execute(update(JOBS).where(JOBS.c.job == job.job).values(
                    state=state, progress=job.progress, ended_ns=job.ended_ns,
                    error=job.error, result=json.dumps(job.result, default=str)))
        except Exception:  # the in-memory status stays right; the row is a copy
            pass

    def held(self) -> list[str]:
        """The ids of the jobs this process keeps in memory (the rest: rows only)."""
        return list(self._jobs)

    def status(self, job_id: str) -> dict[str, Any]:
        job = self._jobs.get(job_id)
        if job is not None:
            return job.status(self.clock())
        with self.engine.connect() as conn:
            row = conn.execute(select(JOBS).where(JOBS.c.job == job_id)).mappings().first()
        if row is None:
            raise JobRefused(f"no job {job_id!r}")
        stored = Job(row["job"], row["verb"], row["subject"], row["actor"], row["started_ns"],
                     row["state"], row["progress"], row["ended_ns"], row["error"],
                     json.loads(row["result"]))
        return stored.status(self.clock())

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a queued or running job to stop at its next step."""
        status = self.status(job_id)
        job = self._jobs.get(job_id)
        if status["state"] in ENDED:
            raise JobRefused(f"job {job_id} has ended ({status['state']}); nothing to cancel")
        if job is None:
            raise JobRefused(f"job {job_id} runs in another hub process; cancel it there")
        job.cancel.set()
        return {**job.status(self.clock()), "cancel_requested": True}

    async def stop(self) -> None:
        """Cancel every task (hub shutdown); a model running in a thread stops at its
        next step."""
        for job in self._jobs.values():
            job.cancel.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
