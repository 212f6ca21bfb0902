"""What a command handler returns, what it may ask of the outside world, and the one
reader of command-body fields.

A handler gets a verified command (hub.commands.envelope.VerifiedCommand) and the
current state (a database connection), and returns an `Outcome`: the events to append,
the operator's answer, and the side effects to run once the events are committed. The
router (hub.commands.router) appends the events under the single write lock; nothing
here talks to NATS: blob reads and KV writes go through `Effects`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, overload

from sqlalchemy import Connection

from hub.commands.envelope import VerifiedCommand
from hub.errors import Refused
from ledger.storage.store import NewEvent

DAY_NS = 24 * 3600 * 10**9

AfterCommit = Callable[[], Awaitable[None]]


class CommandError(Refused):
    """A command was refused; the message goes back to the operator as is."""


@dataclass
class Outcome:
    events: list[NewEvent]
    result: Any
    after_commit: list[AfterCommit] = field(default_factory=list)


# A write verb: checks the command against the state and returns its Outcome (some are
# coroutines: they sign with keys read at the time).
Handler = Callable[[Connection, VerifiedCommand], "Outcome | Awaitable[Outcome]"]
# A command whose slow part (reading blobs, running a model) must not hold the hub's
# single write lock: checks against the current state return this coroutine function,
# which runs with no lock and no database connection and returns the `Handler` that
# re-checks the state and builds the events under the lock (hub.commands.router).
SlowWork = Callable[[], Awaitable[Handler]]
SlowHandler = Callable[[Connection, VerifiedCommand], SlowWork]
# A read verb: answers from the state, appends nothing.
Read = Callable[[VerifiedCommand], Any]


@dataclass
class Verbs:
    """The verbs one capability answers, by kind; the router merges them."""

    writes: dict[str, Handler] = field(default_factory=dict)
    slow_writes: dict[str, SlowHandler] = field(default_factory=dict)
    reads: dict[str, Read] = field(default_factory=dict)
    # Slow writes the router runs as jobs (hub.commands.jobs): answered at once with a
    # job id, committed when the slow part ends.
    jobs: frozenset[str] = frozenset()


class Effects(Protocol):
    """What handlers need from the outside world (NATS in the hub, fakes in tests)."""

    async def read_blob(self, digest: str, size: int, dest: Path) -> str: ...
    async def put_blob(self, digest: str, data: bytes) -> None: ...
    async def take_upload(self, keyid: str, upload_id: str, digest: str, size: int,
                          max_bytes: int, dest: Path, what: str) -> None: ...
    def discard_upload(self, keyid: str, upload_id: str) -> None: ...
    async def store_blob(self, digest: str, path: Path) -> None: ...
    async def release_blob(self, digest: str, size: int) -> None: ...
    async def put_manifest(self, key: str, envelope: bytes) -> None: ...
    async def put_assignment(self, device: str, envelope: bytes) -> None: ...
    async def publish_root(self, data: bytes) -> None: ...
    async def sync_nats_users(self, wait: bool = True) -> bool: ...


def command_event(cmd: VerifiedCommand, kind: str, subject: str, payload: dict[str, Any],
                  with_command: bool = True) -> NewEvent:
    """An event of `cmd`'s operator; it carries the signed command unless told not to."""
    if with_command:
        payload = {**payload, "command": cmd.envelope}
    return NewEvent(kind, cmd.operator.keyid, subject, payload)


class Body:
    """Typed reads of a command body's fields; a wrong or missing field is refused with
    a message that names it (`refuse` is the Refused subclass raised)."""

    def __init__(self, data: Mapping[str, Any], refuse: type[Refused] = CommandError) -> None:
        self.data = data
        self.refuse = refuse

    def text(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value:
            raise self.refuse(f"missing or invalid {key!r}: expected text")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        """A non-negative integer."""
        value = self.data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.refuse(f"missing or invalid {key!r}: expected a non-negative integer")
        return value

    def whole_number(self, key: str, default: int, low: int, high: int | None) -> int:
        """An integer in low..high (no upper bound if `high` is None)."""
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (
                high is not None and value > high):
            bounds = f"{low}..{high}" if high is not None else f">= {low}"
            raise self.refuse(f"invalid {key} {value!r}: expected a whole number {bounds}")
        return value

    def positive(self, key: str) -> int | None:
        """A positive integer, or None if absent."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise self.refuse(f"{key} must be a positive integer")
        return value

    @overload
    def number(self, key: str) -> float | None: ...
    @overload
    def number(self, key: str, default: float) -> float: ...

    def number(self, key: str, default: float | None = None) -> float | None:
        """A number (int or float), or `default` if absent."""
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.refuse(f"invalid {key!r}: expected a number")
        return float(value)

    def map(self, key: str) -> dict[str, Any]:
        """A map, empty if absent."""
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.refuse(f"invalid {key!r}: expected a map")
        return value
