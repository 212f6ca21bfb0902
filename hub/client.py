"""Operator-side client of the hub's NATS API (used by the `hub` CLI and tests)."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import blake3
import nats
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BucketNotFoundError, NotFoundError

from edge_agent.protocol import ProtocolError, decode_map
from ledger.encoding import canonical_encode

from .service import API_PREFIX, MODELS_BUCKET


class HubError(Exception):
    """The hub refused a command or could not be reached."""


def file_digest(path: Path) -> tuple[str, int]:
    hasher = blake3.blake3()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


class HubClient:
    def __init__(self, nc: NATS, timeout: float) -> None:
        self.nc = nc
        self.timeout = timeout

    @classmethod
    async def connect(cls, url: str, timeout: float = 30.0) -> HubClient:
        try:
            nc = await nats.connect(url, name="hub-cli", connect_timeout=5,
                                    max_reconnect_attempts=2, allow_reconnect=False)
        except Exception as exc:
            raise HubError(f"cannot connect to NATS at {url}: {exc}") from exc
        return cls(nc, timeout)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def call(self, verb: str, body: dict[str, Any] | None = None) -> Any:
        try:
            msg = await self.nc.request(
                API_PREFIX + verb, canonical_encode(body or {}), timeout=self.timeout
            )
        except NoRespondersError as exc:
            raise HubError("no hub is serving on this NATS server; start `hub serve`") from exc
        except NatsTimeout as exc:
            raise HubError(f"the hub did not answer {verb} within {self.timeout:.0f} s") from exc
        try:
            reply = decode_map(msg.data, "hub reply")
        except ProtocolError as exc:
            raise HubError(f"unreadable reply from the hub: {exc}") from exc
        if not reply.get("ok"):
            raise HubError(str(reply.get("error", "the hub refused the command")))
        return reply.get("result")

    async def upload_model(self, path: Path) -> tuple[str, int]:
        """Put the file into the Object Store under its BLAKE3 digest."""
        digest, size = file_digest(path)
        js = self.nc.jetstream()
        try:
            obs = await js.object_store(MODELS_BUCKET)
        except (BucketNotFoundError, NotFoundError) as exc:
            raise HubError("the models bucket does not exist yet; start `hub serve` first") from exc
        with open(path, "rb") as fh:
            await obs.put(digest, fh)
        return digest, size

    async def register_model(self, path: Path, name: str, version: str) -> Any:
        digest, size = await self.upload_model(path)
        return await self.call(
            "model.register", {"name": name, "version": version, "digest": digest, "size": size}
        )
