"""Consumers a fleet leaves on the server (issue 6, err 10026 at 1,000 devices), and the
agent's reads on a server without auth (one global account).

- nats-server caps a stream at 1,000 consumers unless the stream says otherwise; the hub
  raises the cap on the buckets every device reads and allows direct gets on them (an
  older hub's buckets have none);
- a model download makes no consumer at all: it reads chunk by chunk with direct gets;
- a watched key (edge_agent.transport.direct.KeyHints) hands on each revision once:
  the value at start, each later put, a delete as None; a hint or a kick with nothing
  new hands on nothing.
"""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js.api import KeyValueConfig, ObjectStoreConfig

from edge_agent.transport.direct import KeyHints
from edge_agent.transport.objects import iter_object_chunks
from hub.service.nats import FLEET_MAX_CONSUMERS, allow_fleet_consumers
from testkit.nats_server import EmbeddedNats

pytestmark = pytest.mark.timeout(60)


async def test_hub_lifts_the_consumer_cap_and_downloads_make_no_consumer(
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
            assert info.config.allow_direct
        await allow_fleet_consumers(js)  # idempotent

        for _ in range(3):
            data = b"".join([c async for c in iter_object_chunks(nc, "releases", "blob", 300_000)])
            assert len(data) == 300_000
        assert (await js.stream_info("OBJ_releases")).state.consumer_count == 0
    finally:
        await nc.close()


async def test_a_watched_key_hands_on_each_revision_once(
        bare_nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(bare_nats_server.url)
    js = nc.jetstream()
    try:
        kv = await js.create_key_value(KeyValueConfig(bucket="assignments", history=1,
                                                      direct=True))
        await kv.put("dev-1", b"one")
        watch = await KeyHints.start(nc, "assignments", "dev-1")
        assert await watch.updates(5) == b"one"
        await kv.put("dev-1", b"two")
        assert await watch.updates(5) == b"two"
        watch.kick()  # nothing new: nothing handed on
        await kv.delete("dev-1")
        assert await watch.updates(5) is None
        await kv.put("dev-1", b"three")
        assert await watch.updates(5) == b"three"
        assert watch.fetches >= 4 and watch.errors == 0
        with pytest.raises(TimeoutError):
            watch.wake()
            await watch.updates(5)
        await watch.stop()
        assert (await js.stream_info("KV_assignments")).state.consumer_count == 0
    finally:
        await nc.close()


async def test_a_watch_on_a_missing_bucket_says_not_published(
        bare_nats_server: EmbeddedNats) -> None:
    from edge_agent.errors import NotPublished

    nc = await nats.connect(bare_nats_server.url)
    try:
        with pytest.raises(NotPublished):
            await asyncio.wait_for(KeyHints.start(nc, "assignments", "dev-1"), 20)
    finally:
        await nc.close()
