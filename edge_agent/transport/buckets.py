"""Bucket handles (KV, Object Store) kept per JetStream context.

nats-py's `js.key_value(name)` and `js.object_store(name)` each ask the server for the
bucket's stream info before returning a handle. An agent opened three of them for every
update (trust roots, manifests, model blobs): three extra round trips per install, and
at 500 agents per process the largest share of the JetStream API requests they made.
A handle only names the bucket's stream and subjects, so it stays valid; a bucket that
is missing is not cached, and the next call asks again.
"""

from __future__ import annotations

import weakref

from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

_kv: weakref.WeakKeyDictionary[JetStreamContext, dict[str, KeyValue]] = (
    weakref.WeakKeyDictionary())
_obs: weakref.WeakKeyDictionary[JetStreamContext, dict[str, ObjectStore]] = (
    weakref.WeakKeyDictionary())


async def key_value(js: JetStreamContext, bucket: str) -> KeyValue:
    held = _kv.setdefault(js, {})
    if bucket not in held:
        held[bucket] = await js.key_value(bucket)
    return held[bucket]


async def object_store(js: JetStreamContext, bucket: str) -> ObjectStore:
    held = _obs.setdefault(js, {})
    if bucket not in held:
        held[bucket] = await js.object_store(bucket)
    return held[bucket]
