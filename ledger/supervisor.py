"""A small supervisor for a process's long-running asyncio tasks (pure: asyncio only).

It lives in `ledger` (the bottom layer) so the hub, the agent and the witness can all
use it. Each task is an async function that runs until cancelled. When one raises:

- the failure is logged once, as one line with the task's name and the error (the
  traceback at DEBUG); further failures in the same streak log at DEBUG only, unless
  the error changes; a task that has run `stable_s` after a failure is logged as
  running again and its streak ends;
- the task is started again after an exponential backoff (`backoff_s`, doubling, at
  most `backoff_max_s`);
- its state is kept for health reads (`states()`: running / restarting / failed /
  stopped, restarts, last error, since).

A critical task that keeps failing, with no stable run in between, for `give_up_s`
seconds and at least `give_up_failures` times cannot work at all (its dependency is
gone for good): it is marked failed and `fatal` is set with the reason; the process
is expected to exit non-zero then (e.g. `hub serve` exits 4) so a service manager
restarts it, instead of living on silent. A task that returns is "stopped" and is
not restarted. An exception of a type in `fatal_errors` (e.g. the witness's
ForkDetected: evidence that must stop the process, not be retried) is fatal at once:
the task is marked failed, `fatal_error` keeps it for the caller to report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

RUNNING = "running"
RESTARTING = "restarting"
FAILED = "failed"
STOPPED = "stopped"


@dataclass
class TaskState:
    name: str
    critical: bool
    state: str = RUNNING
    restarts: int = 0
    last_error: str = ""
    last_error_at: float = 0.0  # wall clock (s)
    since: float = field(default_factory=time.time)  # when it entered its state
    streak: int = 0  # failures since it last ran `stable_s`
    streak_since: float = 0.0  # monotonic time of the first failure of the streak

    def to_map(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "critical": self.critical,
                "restarts": self.restarts, "last_error": self.last_error,
                "last_error_at": self.last_error_at, "since": self.since,
                "failing": self.streak}


class Supervisor:
    def __init__(self, log: logging.Logger, *, backoff_s: float = 0.5,
                 backoff_max_s: float = 30.0, stable_s: float = 30.0,
                 give_up_s: float = 600.0, give_up_failures: int = 20,
                 fatal_errors: tuple[type[BaseException], ...] = ()) -> None:
        self.log = log
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self.give_up_s = give_up_s
        self.give_up_failures = give_up_failures
        self.fatal_errors = fatal_errors
        self.fatal = asyncio.Event()
        self.fatal_reason = ""
        self.fatal_error: BaseException | None = None
        self._states: dict[str, TaskState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]],
              critical: bool = True) -> TaskState:
        """Run `run()` under supervision as task `name`."""
        if name in self._tasks and not self._tasks[name].done():
            raise ValueError(f"task {name} is already supervised")
        state = TaskState(name, critical)
        self._states[name] = state
        self._tasks[name] = asyncio.create_task(self._supervise(state, run), name=name)
        return state

    async def stop_task(self, name: str, timeout: float = 5.0) -> None:
        """Cancel task `name` (if it runs); wait at most `timeout` for it to end. It
        may be started again (e.g. work that only a leader process does)."""
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), timeout)
        state = self._states.get(name)
        if state is not None:
            state.state, state.since = STOPPED, time.time()

    def states(self) -> list[dict[str, Any]]:
        return [s.to_map() for s in self._states.values()]

    def state(self, name: str) -> TaskState:
        return self._states[name]

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel every task; wait at most `timeout` for them to end."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)
        for state in self._states.values():
            state.state, state.since = STOPPED, time.time()
        self._tasks.clear()

    async def _supervise(self, s: TaskState, run: Callable[[], Awaitable[None]]) -> None:
        delay = self.backoff_s
        while True:
            s.state, s.since = RUNNING, time.time()
            task = asyncio.ensure_future(run())
            try:
                done, _ = await asyncio.wait({task}, timeout=self.stable_s)
                if not done and s.streak:
                    self.log.info("%s is running again after %d failure(s)", s.name, s.streak)
                    s.streak, delay = 0, self.backoff_s
                await task
            except asyncio.CancelledError as cancelled:
                current = asyncio.current_task()
                if current is not None and current.cancelling():  # we are being stopped
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    raise
                # The task was cancelled from inside (not by us): a failure like another.
                error: BaseException = RuntimeError(f"cancelled from inside {cancelled}")
            except self.fatal_errors as exc:
                s.state, s.since = FAILED, time.time()
                s.last_error, s.last_error_at = f"{type(exc).__name__}: {exc}", time.time()
                self.fatal_error = exc
                self.fatal_reason = f"{s.name}: {s.last_error}"
                self.log.error("%s stopped: %s", s.name, s.last_error)
                self.fatal.set()
                return
            except Exception as exc:
                error = exc
            else:
                s.state, s.since = STOPPED, time.time()
                return
            if not self._record(s, error):
                return
            self.log.debug("%s failed", s.name, exc_info=error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)

    def _record(self, s: TaskState, exc: BaseException) -> bool:
        """Record and log a failure; False if the task is given up (then `fatal`)."""
        error = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if s.streak == 0:
            s.streak_since = now
        s.streak += 1
        s.restarts += 1
        first = s.streak == 1 or error != s.last_error
        s.last_error, s.last_error_at = error, time.time()
        if (s.critical and s.streak >= self.give_up_failures
                and now - s.streak_since >= self.give_up_s):
            s.state, s.since = FAILED, time.time()
            self.fatal_reason = (f"{s.name} failed {s.streak} times in "
                                 f"{now - s.streak_since:.0f} s: {error}")
            self.log.error("%s cannot work, giving up: %s", s.name, self.fatal_reason)
            self.fatal.set()
            return False
        s.state, s.since = RESTARTING, time.time()
        self.log.log(logging.ERROR if first else logging.DEBUG,
                     "%s failed: %s; restarting (failure %d in a row)", s.name, error, s.streak)
        return True
