"""Watch one key of a KV bucket with a consumer whose filter is in the API subject.

nats-py's `KeyValue.watch` creates its ordered consumer with `$JS.API.CONSUMER.CREATE.
<stream>`, the filter subject only in the request body, so the server cannot tell which
key a client asks for; allowing that subject would let a device read every device's
assignment. Giving the consumer a name makes nats-py use `$JS.API.CONSUMER.CREATE.
<stream>.<name>.<filter>` (nats-server 2.10+), which the server's permissions can limit
to the device's own key (hub/home/nats_config.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.nuid import NUID

KV_OPERATION = "KV-Operation"
INACTIVE_THRESHOLD = 120.0  # seconds; the server drops an abandoned watch's consumer


@dataclass(frozen=True)
class KeyUpdate:
    value: bytes
    revision: int
    operation: str | None  # None for a value; "DEL" or "PURGE"


class KeyWatch:
    """The latest value of `$KV.<bucket>.<key>` and every later update, in order."""

    def __init__(self) -> None:
        self._updates: asyncio.Queue[KeyUpdate | None] = asyncio.Queue()
        self._sub: JetStreamContext.PushSubscription | None = None

    @classmethod
    async def start(cls, js: JetStreamContext, bucket: str, key: str) -> KeyWatch:
        watch = cls()
        name = "w" + NUID().next().decode()
        watch._sub = await js.subscribe(
            f"$KV.{bucket}.{key}", stream=f"KV_{bucket}", cb=watch._on_msg,
            ordered_consumer=True, deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=INACTIVE_THRESHOLD, config=api.ConsumerConfig(name=name),
        )
        _fresh_name_on_recreate(watch._sub)
        flow_control_without_polling(watch._sub)
        return watch

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers or {}
        self._updates.put_nowait(KeyUpdate(msg.data, msg.metadata.sequence.stream,
                                           headers.get(KV_OPERATION)))

    async def updates(self, timeout: float) -> KeyUpdate:
        """The next update; TimeoutError if none comes within `timeout` seconds, or
        earlier if `wake()` was called."""
        update = await asyncio.wait_for(self._updates.get(), timeout)
        if update is None:
            raise TimeoutError("woken")
        return update

    def wake(self) -> None:
        """Make a waiting `updates()` give up now (e.g. to re-watch after a reconnect),
        so callers can wait long instead of waking every second to look at a flag."""
        self._updates.put_nowait(None)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


def _fresh_name_on_recreate(sub: JetStreamContext.PushSubscription) -> None:
    """Give the consumer a new name each time nats-py re-creates the ordered consumer.

    After a gap or missed heartbeats (a busy or briefly disconnected client), nats-py
    re-creates an ordered consumer from the same config, so with the same name; the
    server takes that for an update of the old consumer and refuses it ("deliver policy
    can not be updated", err 10012), and the watch would go silent for good. (nats-py
    2.16 internals; without them the watch works as before.)
    """
    jsi: Any = getattr(getattr(sub, "_sub", None), "_jsi", None)
    original = getattr(jsi, "recreate_consumer", None)
    if original is None or getattr(jsi, "_ccreq", None) is None:
        return

    async def recreate() -> None:
        jsi._ccreq.name = "w" + NUID().next().decode()
        await original()

    jsi.recreate_consumer = recreate


def flow_control_without_polling(sub: Any) -> None:
    """Answer a JetStream flow-control request at once instead of from a task that wakes
    every 250 ms.

    nats-py answers a flow-control request at once when the messages before it were
    delivered, and otherwise from a task it starts for every ordered consumer, which
    polls four times a second for the life of the watch. A device holds two watches
    (its assignment, the trust root) that see a message per update; 500 simulated
    devices in one process spent about a sixth of their CPU in those wake-ups. Answering
    early only lets the server send the next messages sooner. (nats-py 2.x internals;
    without them, nothing changes.)
    """
    jsi: Any = getattr(getattr(sub, "_sub", None), "_jsi", None)
    task = getattr(jsi, "_fctask", None)
    conn = getattr(jsi, "_conn", None)
    if task is None or conn is None or not hasattr(jsi, "schedule_flow_control_response"):
        return
    task.cancel()
    jsi._fctask = None
    sending: set[asyncio.Task[None]] = set()

    async def send(reply: str) -> None:
        with contextlib.suppress(Exception):  # disconnected: the server asks again
            await conn.publish(reply)

    def answer_now(reply: str) -> None:
        jsi._active = True
        task = asyncio.ensure_future(send(reply))
        sending.add(task)  # keep a reference until it is done
        task.add_done_callback(sending.discard)

    jsi.schedule_flow_control_response = answer_now
