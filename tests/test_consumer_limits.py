"""Consumers a fleet leaves on the server (issue 6, err 10026 at 1,000 devices).

- nats-server caps a stream at 1,000 consumers unless the stream says otherwise; the hub
  raises the cap on the buckets every device watches or reads;
- a model download deletes its ephemeral consumer when done, instead of leaving it to
  expire (a wave of 1,000 downloads would otherwise pile up on the stream);
- an assignment watch whose ordered consumer nats-py re-creates (after a gap or missed
  heartbeats) keeps delivering: the re-created consumer gets a new name.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from nats.js.api import KeyValueConfig, ObjectStoreConfig

from edge_agent.transport.kv_watch import KeyWatch
from edge_agent.transport.objects import iter_object_chunks
from hub.service.nats import FLEET_MAX_CONSUMERS, allow_fleet_consumers
from testkit.nats_server import EmbeddedNats


async def test_hub_lifts_the_consumer_cap_and_downloads_clean_up(
        bare_nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(bare_nats_server.url)
    js = nc.jetstream()
    try:
        for bucket in ("assignments", "manifests", "roots"):
            await js.create_key_value(KeyValueConfig(bucket=bucket, history=1))
        obs = await js.create_object_store("releases", config=ObjectStoreConfig())
        await obs.put("blob", b"x" * 300_000)
        await allow_fleet_consumers(js)
        for stream in ("KV_assignments", "KV_manifests", "KV_roots", "OBJ_releases"):
            info = await js.stream_info(stream)
            assert info.config.max_consumers == FLEET_MAX_CONSUMERS
        await allow_fleet_consumers(js)  # idempotent

        for _ in range(3):
            data = b"".join([c async for c in iter_object_chunks(js, "releases", "blob", 300_000)])
            assert len(data) == 300_000
        assert (await js.stream_info("OBJ_releases")).state.consumer_count == 0
    finally:
        await nc.close()


async def test_assignment_watch_survives_a_recreated_ordered_consumer(
        bare_nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(bare_nats_server.url)
    js = nc.jetstream()
    try:
        kv = await js.create_key_value(KeyValueConfig(bucket="assignments", history=1))
        await kv.put("dev-1", b"one")
        watch = await KeyWatch.start(js, "assignments", "dev-1")
        assert (await watch.updates(5)).value == b"one"
        jsi: Any = watch._sub._sub._jsi  # type: ignore[union-attr]
        await jsi.reset_ordered_consumer(jsi._sseq + 1)  # what nats-py does on a gap
        await asyncio.sleep(0.3)
        await kv.put("dev-1", b"two")
        assert (await watch.updates(5)).value == b"two"
        await watch.stop()
    finally:
        await nc.close()
