"""Retention on every stream (issue 12, class 6): a device flood cannot fill the disk.

The hub's streams carry limits (docs/PROTOCOL.md "Retention"): REPORTS and the LEDGER
feed discard their oldest messages past a maximum age, size and (REPORTS) messages per
subject; the KV buckets keep one value per key. A stream made by an older hub, without
limits, is updated in place at start, keeping its messages.
"""

from __future__ import annotations

from pathlib import Path

import nats
import pytest
from nats.js.api import DiscardPolicy, StreamConfig

from edge_agent.protocol.names import (
    ASSIGNMENTS_BUCKET,
    LEDGER_STREAM,
    MANIFESTS_BUCKET,
    REPORTS_STREAM,
    ROOTS_BUCKET,
    UPLOADS_STREAM,
)
from hub.home.config import HomeError, HubConfig, load_config
from hub.service.nats import DAY_S, ensure_stream, stream_configs
from hub.uploads import MAX_UPLOAD_MESSAGE
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(60)


async def test_the_streams_of_a_serving_hub_have_limits(fleet: Fleet) -> None:
    js = fleet.hub.edge.js
    reports = (await js.stream_info(REPORTS_STREAM)).config
    assert reports.max_age == 7 * DAY_S
    assert reports.max_bytes == 1 << 30
    assert reports.max_msgs_per_subject == 50_000
    assert reports.discard == DiscardPolicy.OLD
    feed = (await js.stream_info(LEDGER_STREAM)).config
    assert feed.max_age == 7 * DAY_S and feed.max_bytes == 1 << 30
    assert feed.discard == DiscardPolicy.OLD
    for bucket in (ASSIGNMENTS_BUCKET, MANIFESTS_BUCKET, ROOTS_BUCKET):
        assert (await js.stream_info(f"KV_{bucket}")).config.max_msgs_per_subject == 1


async def test_an_older_hubs_stream_is_updated_in_place(
        bare_nats_server: EmbeddedNats, tmp_path: Path) -> None:
    config = HubConfig(home=tmp_path, nats_url=bare_nats_server.url, database="x.db",
                       reports_max_age_days=2.0, reports_max_bytes=10_000_000,
                       reports_max_msgs_per_subject=100)
    nc = await nats.connect(bare_nats_server.url)
    js = nc.jetstream()
    try:
        await js.add_stream(StreamConfig(name=REPORTS_STREAM, subjects=["fleet.report.>"],
                                         duplicate_window=600.0))  # what an older hub made
        await js.publish("fleet.report.dev-1.status", b"kept")
        old = (await js.stream_info(REPORTS_STREAM)).config
        assert old.max_age in (0, None) and old.max_bytes in (-1, None)

        wanted = stream_configs(config)
        # REPORTS updated, LEDGER and UPLOADS (hub.uploads) created.
        assert [await ensure_stream(js, w) for w in wanted] == [True, True, True]
        assert [await ensure_stream(js, w) for w in wanted] == [False] * 3  # idempotent
        uploads = (await js.stream_info(UPLOADS_STREAM)).config
        assert (uploads.max_age, uploads.max_bytes) == (3600.0, 1 << 30)
        assert uploads.max_msg_size == MAX_UPLOAD_MESSAGE
        info = await js.stream_info(REPORTS_STREAM)
        assert info.config.max_age == 2 * DAY_S
        assert info.config.max_bytes == 10_000_000
        assert info.config.max_msgs_per_subject == 100
        assert info.state.messages == 1  # updated, not re-created

        for n in range(105):  # the limit per subject holds: the oldest go
            await js.publish("fleet.report.dev-2.telemetry", str(n).encode())
        assert (await js.stream_info(REPORTS_STREAM)).state.messages == 101
    finally:
        await nc.close()


def test_limits_are_config_settings(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'nats_url = "nats://127.0.0.1:4222"\nreports_max_age_days = 1.5\n'
        "ledger_feed_max_bytes = 5000000\n")
    config = load_config(tmp_path)
    assert config.reports_max_age_days == 1.5 and config.ledger_feed_max_bytes == 5_000_000
    assert config.reports_max_bytes == 1 << 30  # the default
    (tmp_path / "config.toml").write_text(
        'nats_url = "nats://127.0.0.1:4222"\nreports_max_bytes = 0\n')
    with pytest.raises(HomeError, match="reports_max_bytes"):
        load_config(tmp_path)
