"""The hub's two durable consumers on REPORTS (hub.devices.reports.ensure_report_consumers):
made at the first start, left alone (or brought to the hub's settings) at the next, and on
a home made by an older hub (one durable, `hub-reports`, that took status reports too) the
leader's `hub-status` starts where the old consumer's acknowledgements end: a status
report it had acknowledged is not delivered again, one it had not is."""

from __future__ import annotations

import nats
import pytest
from nats.js.api import StreamConfig

from edge_agent.protocol.names import (
    REPORT_SUBJECTS,
    REPORTS_DURABLE,
    REPORTS_STREAM,
    STATUS_DURABLE,
    STATUS_REPORT_SUBJECTS,
)
from hub.devices.reports import REPORT_MAX_ACK_PENDING, ensure_report_consumers
from testkit.nats_server import EmbeddedNats

pytestmark = [pytest.mark.timeout(60), pytest.mark.nats]


async def test_consumers_are_made_once_and_an_old_home_is_upgraded(
        bare_nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(bare_nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=REPORTS_STREAM, subjects=[REPORT_SUBJECTS]))
        # An older hub: one durable on every report subject, made by pull_subscribe.
        old = await js.pull_subscribe(REPORT_SUBJECTS, durable=REPORTS_DURABLE,
                                      stream=REPORTS_STREAM)
        for n in range(3):
            await js.publish(f"fleet.report.d{n}.status", b"old-%d" % n)
        await js.publish("fleet.report.d0.telemetry", b"window")
        taken = await old.fetch(2, timeout=5)
        for msg in taken:  # the older hub stored and acknowledged the first two
            await msg.ack_sync()  # (an upgrade starts after the old hub stopped)
        await old.unsubscribe()

        await ensure_report_consumers(js)
        shared = await js.consumer_info(REPORTS_STREAM, REPORTS_DURABLE)
        assert shared.config.max_ack_pending == REPORT_MAX_ACK_PENDING  # updated in place
        assert shared.num_pending == 2  # its position is kept
        status = await js.consumer_info(REPORTS_STREAM, STATUS_DURABLE)
        assert status.config.filter_subject == STATUS_REPORT_SUBJECTS
        sub = await js.pull_subscribe_bind(STATUS_DURABLE, stream=REPORTS_STREAM)
        got = await sub.fetch(10, timeout=2)
        # Only the status report the older hub had not acknowledged.
        assert [m.data for m in got] == [b"old-2"]
        for msg in got:
            await msg.ack()

        await ensure_report_consumers(js)  # the next start: idempotent, keeps its position
        await js.publish("fleet.report.d9.status", b"new")
        assert [m.data for m in await sub.fetch(10, timeout=2)] == [b"new"]
    finally:
        await nc.close()


async def test_a_fresh_home_gets_both_consumers_from_the_start(
        bare_nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(bare_nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=REPORTS_STREAM, subjects=[REPORT_SUBJECTS]))
        await js.publish("fleet.report.d1.status", b"s")
        await js.publish("fleet.report.d1.telemetry", b"t")
        await ensure_report_consumers(js)
        await ensure_report_consumers(js)  # a second process starting: no change
        shared = await js.consumer_info(REPORTS_STREAM, REPORTS_DURABLE)
        status = await js.consumer_info(REPORTS_STREAM, STATUS_DURABLE)
        assert (shared.num_pending, status.num_pending) == (2, 1)
    finally:
        await nc.close()
