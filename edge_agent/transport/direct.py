"""Reading the hub's buckets with JetStream direct gets, and watching a key by hint.

A device runs no JetStream call in the account that owns the hub's streams: it has no
JetStream API there at all, only a few read-only services the hub's account exports
(docs/PROTOCOL.md "Permissions"): `$JS.API.DIRECT.GET.<stream>.<subject>` (the last
message on a subject) and, for model chunks, `$JS.API.DIRECT.GET.OBJ_models` with a
`{"seq", "next_by_subj"}` body. The answer comes to the device's own inbox.

A watched key (its assignment, `root.latest`) is a core subscription on
`$KV.<bucket>.<key>`, which the hub's account exports as a stream: a KV put is a
message on that subject. The message is used only as a **hint**: its bytes are never
used as the value. The value comes from a direct get, at start, on each hint, after a reconnect
(`kick()`) and on a slow poll (a lost hint costs at most POLL_SECONDS). Why: another
device, in the same account, can make the server deliver a service response onto
`$KV.assignments.<this device>` inside the devices' account (a reply-subject trick on
a request of its own); so a hint may be forged, and it must cost a bounded number of
fetches, never a wrong value. Fetches are coalesced: one in flight and one pending,
whatever the number of hints. A hint can overtake the stream's own write of the value
it announces (the server hands the message to subscribers and to the stream's store
independently; a server busy recovering its streams after a restart stores late), so
while the value read differs from the last hint's bytes (compared, never used) the key
is read again after each of RECHECKS: a burst of hints, forged or not, costs at most
1 + len(RECHECKS) fetches over about 30 s. A fetch that fails is tried again with
backoff up to RETRY_CAP_SECONDS.

The same code works on a server without auth (one global account): the subjects are
the same there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError

from edge_agent.errors import FetchError, NotPublished

log = logging.getLogger("edge_agent.nats")

DIRECT_GET = "$JS.API.DIRECT.GET."
KV_OPERATION = "KV-Operation"
POLL_SECONDS = 60.0  # the safety net under the hints
# Seconds between re-reads while the value differs from the last hint (~31 s in all).
RECHECKS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
RETRY_SECONDS = 0.25  # after a failed fetch, doubling ...
RETRY_CAP_SECONDS = 5.0  # ... up to this
FETCH_TIMEOUT = 10.0


@dataclass(frozen=True)
class Stored:
    """One message as a direct get returns it."""

    data: bytes
    subject: str
    seq: int
    headers: dict[str, str]

    @property
    def deleted(self) -> bool:
        """A KV delete or purge marker."""
        return self.headers.get(KV_OPERATION) in ("DEL", "PURGE")


def _stored(msg: Msg, what: str) -> Stored | None:
    """The message in a direct-get answer; None for "no such message"."""
    headers = msg.headers or {}
    status = headers.get("Status")
    if status == "404":
        return None
    if status is not None:
        raise FetchError(f"{what}: the server answers {status} "
                         f"{headers.get('Description', '')}".rstrip())
    try:
        seq = int(headers["Nats-Sequence"])
        subject = headers["Nats-Subject"]
    except (KeyError, ValueError) as exc:
        raise FetchError(f"{what}: a direct-get answer without a valid Nats-Sequence "
                         "and Nats-Subject") from exc
    return Stored(msg.data, subject, seq, dict(headers))


async def direct_get(nc: NATS, stream: str, *, subject: str | None = None,
                     body: dict[str, Any] | None = None,
                     timeout: float = FETCH_TIMEOUT) -> Stored | None:
    """The last message on `subject` (or the one `body` asks for) in `stream`; None if
    there is none. NotPublished if the stream is not there (no responder), FetchError
    for a timeout, a lost connection or a refusal."""
    api = f"{DIRECT_GET}{stream}" + (f".{subject}" if subject is not None else "")
    payload = json.dumps(body).encode() if body is not None else b""
    what = f"reading {subject or body} from {stream}"
    try:
        msg = await nc.request(api, payload, timeout=timeout)
    except NoRespondersError as exc:
        raise NotPublished(f"{stream} is not there (yet)") from exc
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # timed out, disconnected
        raise FetchError(f"{what}: {exc!r}") from exc
    return _stored(msg, what)


class KeyHints:
    """`KeyUpdates` for one KV key: hints on a core subscription, the value by direct
    get (see the module docstring). `updates()` gives each new revision once: its value,
    or None for a delete or purge."""

    def __init__(self, nc: NATS, bucket: str, key: str, poll: float = POLL_SECONDS) -> None:
        self._nc = nc
        self._stream = f"KV_{bucket}"
        self._subject = f"$KV.{bucket}.{key}"
        self._poll = poll
        self._values: asyncio.Queue[bytes | object | None] = asyncio.Queue()
        self._kick = asyncio.Event()
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._seq: int | None = None  # the revision handed on last (None: none yet)
        self._hinted: bytes | None = None  # the last hint's bytes, until the value matches
        self.hints = 0  # hint messages seen (forged ones included)
        self.fetches = 0
        self.errors = 0  # fetches that failed (the next hint or poll tries again)
        self._said = ""

    @classmethod
    async def start(cls, nc: NATS, bucket: str, key: str,
                    poll: float = POLL_SECONDS) -> KeyHints:
        """Subscribe, then read the current value (so no put falls between the two).
        NotPublished if the bucket is not there, FetchError if it cannot be read."""
        hints = cls(nc, bucket, key, poll)
        hints._sub = await nc.subscribe(hints._subject, cb=hints._on_hint)
        try:
            await hints._fetch()
        except BaseException:
            await hints.stop()
            raise
        hints._task = asyncio.create_task(hints._run(), name=f"hints {hints._subject}")
        return hints

    async def _on_hint(self, msg: Msg) -> None:
        self.hints += 1
        self._hinted = msg.data  # compared with what the direct get says, never used
        self._kick.set()

    def kick(self) -> None:
        """Read the value again soon (a reconnect: hints may have been lost)."""
        self._kick.set()

    async def _fetch(self) -> bytes | None:
        """Read the key, hand on a new revision; the bytes stored (None: no message)."""
        self.fetches += 1
        stored = await direct_get(self._nc, self._stream, subject=self._subject)
        if stored is None:
            if self._seq is not None:  # it was there and is gone: a purge
                self._seq = None
                self._values.put_nowait(None)
            return None
        if stored.subject != self._subject:
            raise FetchError(f"asked for {self._subject}, the server answers with "
                             f"{stored.subject[:80]}")
        if stored.seq != self._seq:  # else nothing new (a forged hint, a poll, not yet)
            self._seq = stored.seq
            self._values.put_nowait(None if stored.deleted else stored.data)
        return stored.data

    async def _run(self) -> None:
        delay = self._poll
        rechecks: list[float] = []
        failures = 0
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), delay)
                hinted = True
            except TimeoutError:
                hinted = False
            # Hints that come during the fetch set the event again: one more fetch
            # after this one, however many they were.
            self._kick.clear()
            try:
                seen = await self._fetch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NotPublished, FetchError: again, with backoff
                self.errors += 1
                failures += 1
                delay = min(RETRY_CAP_SECONDS, RETRY_SECONDS * 2 ** (failures - 1))
                if str(exc) != self._said:
                    self._said = str(exc)
                    log.warning("cannot read %s (trying again, at most every %g s): %s",
                                self._subject, RETRY_CAP_SECONDS, exc)
                continue
            failures = 0
            if self._hinted is None or seen == self._hinted:
                self._hinted, rechecks = None, []  # caught up with the last hint
            elif hinted:
                rechecks = list(RECHECKS)  # the store may not have the value yet
            if rechecks:
                delay = rechecks.pop(0)
            else:
                self._hinted, delay = None, self._poll

    async def updates(self, timeout: float) -> bytes | None:
        """The next revision's value (None: deleted); TimeoutError if none comes within
        `timeout` seconds, or earlier if `wake()` was called."""
        value = await asyncio.wait_for(self._values.get(), timeout)
        if value is _WOKEN:
            raise TimeoutError("woken")
        assert value is None or isinstance(value, bytes)
        return value

    def wake(self) -> None:
        self._values.put_nowait(_WOKEN)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


_WOKEN = object()
