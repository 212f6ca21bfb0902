"""An upload chunk met by a cluster stream's 503 (its replicas electing a leader) is sent
again until the stream answers, and given up after a bound (hub.client.publish_chunk)."""

from __future__ import annotations

from typing import Any

import pytest
from nats.js.errors import ServiceUnavailableError

from hub import client


class FlakyStream:
    """A stand-in for JetStream's publish that answers 503 `failures` times first."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[dict[str, str]] = []

    async def publish(self, subject: str, data: bytes, stream: str,
                      headers: dict[str, str]) -> None:
        self.calls.append(headers)
        if len(self.calls) <= self.failures:
            raise ServiceUnavailableError(code=503, description="stream leader not elected")


async def test_a_chunk_is_sent_again_while_the_stream_elects_its_leader() -> None:
    js: Any = FlakyStream(failures=2)
    headers = {"Nats-Msg-Id": "u.0"}
    await client.publish_chunk(js, "upload.k.u", b"chunk", headers)
    # Three times, with the same message id: JetStream keeps one copy.
    assert js.calls == [headers, headers, headers]


async def test_a_stream_that_stays_unavailable_is_given_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "UNAVAILABLE_RETRY_S", 0.3)
    js: Any = FlakyStream(failures=10**6)
    with pytest.raises(ServiceUnavailableError):
        await client.publish_chunk(js, "upload.k.u", b"chunk", {"Nats-Msg-Id": "u.0"})
    assert 1 < len(js.calls) < 10
