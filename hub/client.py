"""Operator-side client of the hub's NATS API (used by the `hub` CLI and tests).

Errors are `hub.errors` types, split by what the caller does next: `Unreachable` when
NATS cannot be reached, no hub answers, or the answer does not come in time; `Refused`
when the hub answered with an error (or with something unreadable).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import blake3
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import Error as JsError
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from edge_agent.protocol import ProtocolError, decode_map
from edge_agent.protocol.names import (
    API_PREFIX,
    UPLOAD_CHUNK_BYTES,
    UPLOAD_CHUNK_HEADER,
    UPLOADS_STREAM,
    upload_subject,
)
from edge_agent.transport.connect import NO_AUTH, NatsAuth
from edge_agent.transport.connect import connect as nats_connect
from hub.commands.envelope import AUDIENCE_VERB, sign_command
from hub.errors import Refused, Unreachable
from hub.home.nats_config import operator_inbox_prefix
from ledger.signing import SigningKey


def file_digest(path: Path) -> tuple[str, int]:
    hasher = blake3.blake3()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


@dataclass(frozen=True)
class Upload:
    """A file staged for the hub: what a command names (`upload`, `digest`, `size`)."""

    upload_id: str
    digest: str
    size: int


Progress = Callable[[int, int], None]  # (bytes sent, total)


async def _quiet(exc: Exception) -> None:
    """nats-py prints a traceback per failed attempt by default; the CLI says one line."""


async def _quiet_event() -> None:
    pass


VALIDATION_POLL_S = 0.25  # how often a waiting client asks a validation job's status


class HubClient:
    """Sends operator commands, each signed with the operator's own key for one hub
    (`audience`: the hub's origin, from its config.toml; None: asked of the hub with
    the unsigned `audience` verb before the first command)."""

    def __init__(self, nc: NATS, key: SigningKey, timeout: float,
                 audience: str | None = None) -> None:
        self.nc = nc
        self.key = key
        self.timeout = timeout
        self.audience = audience

    @classmethod
    async def connect(cls, url: str, key: SigningKey, timeout: float = 30.0,
                      auth: NatsAuth = NO_AUTH, audience: str | None = None) -> HubClient:
        """Connect as an operator: `auth` is the NATS identity (config.nats_auth()),
        `key` the operator's own signing key, `audience` the hub's origin (pinned from
        its config.toml; None: learned from the hub). Answers come to the key's own inbox
        prefix (`_INBOX_OPERATOR.<keyid>`), the only place the hub answers its commands
        (hub/home/replies.py), whichever NATS user the connection signs in as."""
        if auth.inbox_prefix is None:
            auth = replace(auth, inbox_prefix=operator_inbox_prefix(key.keyid))
        try:
            nc = await nats_connect(url, auth, name="hub-cli", connect_timeout=5,
                                    max_reconnect_attempts=1, reconnect_time_wait=0.2,
                                    allow_reconnect=False,
                                    error_cb=_quiet, disconnected_cb=_quiet_event)
        except Exception as exc:
            raise Unreachable(f"cannot connect to NATS at {url}: {exc}") from exc
        # Signed in with an operator's nkey, the connection is in the OPERATORS account:
        # no JetStream API there at all; uploads are plain publishes to the hub's UPLOADS
        # stream through a service import (hub.home.nats_config.UPLOAD_SERVICE).
        return cls(nc, key, timeout, audience)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def hub_audience(self) -> str:
        """The origin of the hub serving here (what commands are signed for)."""
        if self.audience is None:
            result = await self._request(AUDIENCE_VERB, b"")
            if not isinstance(result, dict) or not isinstance(result.get("audience"), str):
                raise Refused("the hub did not say its audience; is it older than this client?")
            self.audience = str(result["audience"])
        return self.audience

    async def call(self, verb: str, body: dict[str, Any] | None = None) -> Any:
        audience = await self.hub_audience()
        return await self._request(
            verb, sign_command(self.key, verb, body or {}, audience=audience))

    async def _request(self, verb: str, data: bytes) -> Any:
        try:
            msg = await self.nc.request(API_PREFIX + verb, data, timeout=self.timeout)
        except NoRespondersError as exc:
            raise Unreachable("no hub is serving on this NATS server; start `hub serve`") from exc
        except NatsTimeout as exc:
            raise Unreachable(f"the hub did not answer {verb} within {self.timeout:.0f} s") from exc
        except NatsError as exc:  # e.g. closed: the server dropped us (a revoked operator)
            raise Unreachable(f"the NATS connection failed during {verb}: {exc}") from exc
        try:
            reply = decode_map(msg.data, "hub reply")
        except ProtocolError as exc:
            raise Refused(f"unreadable reply from the hub: {exc}") from exc
        if not reply.get("ok"):
            raise Refused(str(reply.get("error", "the hub refused the command")))
        return reply.get("result")

    async def pages(self, verb: str, body: dict[str, Any] | None = None,
                    rows: str = "devices") -> AsyncIterator[dict[str, Any]]:
        """Each reply of a paged read verb, from `body`'s offset to the last page.

        The next page starts at the reply's `next_offset` (None: that was the last);
        a verb whose replies carry no `next_offset` (`telemetry`) has more pages while
        a reply fills the `limit` asked for.
        """
        body = dict(body or {})
        while True:
            page: dict[str, Any] = await self.call(verb, body)
            yield page
            if "next_offset" in page:
                offset = page["next_offset"]
            elif "limit" in body and len(page[rows]) == body["limit"]:
                offset = body.get("offset", 0) + len(page[rows])
            else:
                offset = None
            if offset is None:
                return
            body["offset"] = offset

    async def all_pages(self, verb: str, body: dict[str, Any] | None = None,
                        rows: str = "devices") -> dict[str, Any]:
        """The last reply of a paged read verb with every page's `rows` in it."""
        collected: list[Any] = []
        last: dict[str, Any] = {}
        async for page in self.pages(verb, body, rows):
            collected += page[rows]
            last = page
        return {**last, rows: collected}

    async def devices(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every device (optionally only those in `state`), page by page."""
        body: dict[str, Any] = {"offset": 0}
        if state is not None:
            body["state"] = state
        rows: list[dict[str, Any]] = (await self.all_pages("devices", body))["devices"]
        return rows

    async def upload(self, path: Path, progress: Progress | None = None) -> Upload:
        """Stage a file (model or data set) for the hub: its chunks go, each acknowledged
        by JetStream, to `upload.<this key id>.<new upload id>` in the hub's UPLOADS
        stream (hub/uploads.py); a command then names the upload. Operators have no
        Object Store rights: the hub checks the upload and stores it itself."""
        digest, size = file_digest(path)
        upload_id = secrets.token_hex(16)
        subject = upload_subject(self.key.keyid, upload_id)
        js = self.nc.jetstream(timeout=self.timeout)
        sent = 0
        with open(path, "rb") as fh:
            index = 0
            while chunk := fh.read(UPLOAD_CHUNK_BYTES):
                # The message id makes a resent chunk a no-op (JetStream's duplicate
                # window), should an ack be lost.
                headers = {UPLOAD_CHUNK_HEADER: str(index),
                           "Nats-Msg-Id": f"{upload_id}.{index}"}
                try:
                    await publish_chunk(js, subject, chunk, headers)
                except NoStreamResponseError as exc:
                    raise Unreachable("the hub's upload stream is not there; start `hub "
                                      "serve` first") from exc
                except NatsTimeout as exc:
                    raise Unreachable(f"uploading {path.name}: chunk {index} was not "
                                      f"acknowledged within {self.timeout:.0f} s") from exc
                except JsError as exc:  # the stream refused it (full, too big)
                    raise Refused(f"uploading {path.name}: chunk {index} refused: "
                                  f"{exc}") from exc
                except NatsError as exc:
                    raise Unreachable(f"uploading {path.name}: {exc}") from exc
                index += 1
                sent += len(chunk)
                if progress is not None:
                    progress(sent, size)
        return Upload(upload_id, digest, size)

    async def register_model(
        self, path: Path, name: str, version: str,
        lineage: dict[str, Any] | None = None, card: dict[str, Any] | None = None,
        input_shapes: dict[str, list[int]] | None = None,
    ) -> Any:
        """Upload and register a model; `input_shapes` declares the run shape of dynamic
        inputs (input name -> shape), checked by the hub's preflight and recorded."""
        staged = await self.upload(path)
        return await self.call("model.register", {
            "name": name, "version": version, "upload": staged.upload_id,
            "digest": staged.digest, "size": staged.size,
            "lineage": lineage or {}, "card": card or {},
            **({"input_shapes": input_shapes} if input_shapes else {}),
        })

    async def validate_model(self, name: str, version: str, data: Path, *, wait: bool = True,
                             on_status: Callable[[dict[str, Any]], None] | None = None,
                             poll_s: float = VALIDATION_POLL_S) -> Any:
        """Upload the validation set (.npz) and ask the hub to run the gate. The hub
        answers at once with a job; with `wait` (the default) this polls the job and
        returns the validation's result as the hub recorded it (`wait_validation`),
        else the job's first answer ({job, state, ...})."""
        staged = await self.upload(data)
        started = await self.call("model.validate", {
            "name": name, "version": version, "data_upload": staged.upload_id,
            "data_digest": staged.digest, "data_size": staged.size,
        })
        if not wait or not isinstance(started, dict) or "job" not in started:
            return started  # an older hub answers with the result itself
        return await self.wait_validation(str(started["job"]), on_status, poll_s)

    async def wait_validation(self, job: str,
                              on_status: Callable[[dict[str, Any]], None] | None = None,
                              poll_s: float = VALIDATION_POLL_S) -> Any:
        """Poll `model.validation` until the job ends: its result when done; Refused
        with the job's error when it failed or was cancelled. `on_status` sees every
        status (a progress bar)."""
        while True:
            status = await self.call("model.validation", {"job": job})
            if on_status is not None:
                on_status(status)
            state = status.get("state")
            if state == "done":
                return status.get("result")
            if state == "failed":
                raise Refused(str(status.get("error") or f"validation job {job} failed"))
            if state == "cancelled":
                raise Refused(f"validation job {job} was cancelled; nothing was recorded")
            await asyncio.sleep(poll_s)


# A stream of a cluster answers 503 while its replicas elect a leader (just made, or a
# node lost); the message id makes a resent chunk a no-op, so asking again is safe.
UNAVAILABLE_RETRY_S = 10.0


async def publish_chunk(js: Any, subject: str, chunk: bytes, headers: dict[str, str],
                        ) -> None:
    """One upload chunk into UPLOADS, tried again for a while on "unavailable"."""
    deadline = asyncio.get_running_loop().time() + UNAVAILABLE_RETRY_S
    while True:
        try:
            await js.publish(subject, chunk, stream=UPLOADS_STREAM, headers=headers)
            return
        except ServiceUnavailableError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.25)
