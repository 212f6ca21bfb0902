"""A device behind an edge site's leaf node keeps its own connection while the site's
uplink is cut: no reconnect tells it that hints were lost meanwhile. The first report
acknowledged after failed ones does: every watched key is read again
(edge_agent.transport.nats_transport.NatsTransport.publish). The end-to-end case, with
a real leaf and a real cut, is in tests/test_nats_cluster.py."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.errors import FetchError
from edge_agent.transport.nats_transport import NatsTransport


class FlakyJetStream:
    """`publish` fails while `down`, like a PubAck that never comes."""

    def __init__(self) -> None:
        self.down = False
        self.published = 0

    async def publish(self, subject: str, data: bytes, **_: Any) -> None:
        if self.down:
            raise TimeoutError("nats: timeout")
        self.published += 1


class Watch:
    def __init__(self) -> None:
        self.kicks = 0

    def kick(self) -> None:
        self.kicks += 1


class FakeClient:
    def jetstream(self) -> FlakyJetStream:
        return FlakyJetStream()


async def test_a_report_acknowledged_after_failures_rereads_the_watched_keys() -> None:
    transport = NatsTransport(FakeClient())  # type: ignore[arg-type]
    js: FlakyJetStream = transport.js  # type: ignore[assignment]
    watch = Watch()
    transport._watches.add(watch)  # type: ignore[arg-type]
    await transport.publish("fleet.report.d.telemetry", b"1", "d.1.1")
    assert watch.kicks == 0  # acknowledged all along: hints were not lost
    js.down = True
    for seq in (2, 3):
        with pytest.raises(FetchError):
            await transport.publish("fleet.report.d.telemetry", b"x", f"d.1.{seq}")
    assert watch.kicks == 0
    js.down = False
    await transport.publish("fleet.report.d.telemetry", b"2", "d.1.2")
    assert watch.kicks == 1  # once, for the whole outage
    await transport.publish("fleet.report.d.telemetry", b"3", "d.1.3")
    assert watch.kicks == 1 and js.published == 3
