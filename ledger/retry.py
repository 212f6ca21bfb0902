"""Retrying a connection quietly (pure: asyncio and logging only).

The hub, the agent and the witness all connect to NATS and must keep trying while the
server is down or refuses them, without flooding their logs and without ignoring a stop
request. `retry` gives them one behaviour:

- one log line per failed attempt, naming the reason (`failure_reason`: unreachable,
  unauthorised, revoked, tls) and when the next attempt is, never a traceback;
- exponential backoff (`backoff_delay`: `first` doubling up to `cap`, with +-20 %
  jitter so a fleet that lost its server does not come back in lock-step);
- a `stop` event ends the wait at once, also in the middle of an attempt (`Stopped`);
- `give_up_after` seconds: the last error is raised (None: try for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

UNREACHABLE = "unreachable"
UNAUTHORISED = "unauthorised"
REVOKED = "revoked"
TLS = "tls"


class Stopped(Exception):
    """The stop event was set while connecting: the caller stops, cleanly."""


def failure_reason(exc: BaseException) -> str:
    """Why a NATS connection attempt failed, in one word a person can act on."""
    text = str(exc).lower()
    if "revoked" in text:
        return REVOKED
    if "authorization" in text or "authentication" in text or "permissions" in text:
        return UNAUTHORISED
    if isinstance(exc, ssl.SSLError) or "ssl" in text or "certificate" in text:
        return TLS
    return UNREACHABLE


def describe(exc: BaseException) -> str:
    """The error in one line (its message, else its type)."""
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def redact(url: str) -> str:
    """A server URL without the user and password it may carry (for log lines)."""
    return re.sub(r"://[^@/]*@", "://", url)


def nats_servers(url: str) -> list[str]:
    """The server URLs of a comma-separated list (`nats://a:4222,nats://b:4222`): what
    nats-py takes as `servers=[...]` (it does not split a string itself). Once
    connected, nats-py also learns the other cluster members from the server (its
    INFO `connect_urls`), so one reachable URL is enough to fail over later."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    return servers or [url]


def backoff_delay(attempt: int, first: float = 0.25, cap: float = 5.0,
                  jitter: float = 0.2) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 = the first)."""
    base = min(cap, first * (2.0 ** max(0, min(attempt - 1, 30))))
    return max(0.0, base * (1.0 + random.uniform(-jitter, jitter)))


async def _until_stopped(stop: asyncio.Event | None, work: Awaitable[T]) -> T:
    """`work`, unless `stop` is set first (then Stopped; `work` is cancelled)."""
    if stop is None:
        return await work
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(task, 1.0)
    raise Stopped()


async def retry(attempt: Callable[[], Awaitable[T]], *, what: str, log: logging.Logger,
                stop: asyncio.Event | None = None, give_up_after: float | None = None,
                first: float = 0.25, cap: float = 5.0) -> T:
    """`attempt()` until it returns; one line per failure (see the module docstring)."""
    started = time.monotonic()
    failures = 0
    while True:
        if stop is not None and stop.is_set():
            raise Stopped()
        try:
            result = await _until_stopped(stop, attempt())
        except (Stopped, asyncio.CancelledError):
            raise
        except Exception as exc:
            failures += 1
            delay = backoff_delay(failures, first, cap)
            reason = failure_reason(exc)
            left = None if give_up_after is None else \
                give_up_after - (time.monotonic() - started)
            extra = {"reason": reason, "attempt": failures, "error": describe(exc)}
            if left is not None and left <= delay:
                log.error("%s failed (%s: %s); giving up after %d attempts", what, reason,
                          describe(exc), failures, extra=extra)
                raise
            log.warning("%s failed (%s: %s); attempt %d, next in %.1f s", what, reason,
                        describe(exc), failures, delay, extra={**extra, "retry_in_s": delay})
            await _until_stopped(stop, asyncio.sleep(delay))
            continue
        if failures:
            log.info("%s succeeded after %d failed attempts", what, failures)
        return result


async def connect_for_good(connect: Callable[..., Awaitable[Any]], url: str, *,
                           log: logging.Logger, stop: asyncio.Event | None = None,
                           give_up_after: float | None = None, cap: float = 5.0,
                           **options: Any) -> Any:
    """`connect(url, **options)` (nats-py's `nats.connect`, handed in: this module does
    no I/O of its own) retried with `retry`; once connected, nats-py reconnects for ever
    with the same backoff (its `reconnect_to_server_handler`), one line per failed
    reconnect (its `error_cb`), never nats-py's traceback."""
    errors: list[Exception] = []
    connected = False

    async def on_error(exc: Exception) -> None:
        if not connected:
            errors.append(exc)  # the attempt's failure is logged once, by `retry`
            return
        reason = failure_reason(exc)
        log.warning("NATS connection to %s: %s (%s); reconnecting", redact(url),
                    describe(exc),
                    reason, extra={"reason": reason, "error": describe(exc)})

    def next_server(servers: list[Any], _: dict[str, Any]) -> tuple[Any, float]:
        # The server that failed least often (nats-py shuffled the list): with a cluster,
        # a dead node is left for a live one at once instead of being retried for ever;
        # the backoff grows only once every server has failed.
        server = min(servers, key=lambda s: s.reconnects)
        return server, backoff_delay(server.reconnects, cap=cap) if server.reconnects else 0.0

    async def attempt() -> Any:
        errors.clear()
        try:
            # Two quick tries (nats-py's least), then back to `retry` and its backoff.
            return await connect(nats_servers(url), **options, error_cb=on_error,
                                 allow_reconnect=True, max_reconnect_attempts=1,
                                 reconnect_time_wait=0, reconnect_to_server_handler=next_server)
        except Exception as exc:
            # The most telling of the tries' errors: a refusal says more than the reset
            # that follows it on the same attempt.
            rank = (UNREACHABLE, TLS, UNAUTHORISED, REVOKED)
            telling = max(reversed(errors), key=lambda e: rank.index(failure_reason(e)),
                          default=exc)
            raise telling from exc

    nc = await retry(attempt, what=f"connecting to NATS at {redact(url)}", log=log, stop=stop,
                     give_up_after=give_up_after, cap=cap)
    connected = True
    nc.options["max_reconnect_attempts"] = -1  # for good from now on
    return nc
