"""Trust roots between the ledger, HOME and the KV bucket `roots`, where agents walk
the chain (`root.<N>` and `root.latest`)."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from sqlalchemy import Connection

from edge_agent import protocol as proto
from edge_agent.protocol.names import ROOT_LATEST_KEY, ROOTS_BUCKET, root_key
from hub import events as ev
from hub.keys.keyring import Keyring
from ledger.storage import query
from ledger.storage.store import LedgerStore


def roots_from_ledger(conn: Connection) -> list[bytes]:
    """Every root the ledger records (keys.rotated / keys.revoked), oldest first."""
    changes = query.EntryFilter(kinds=(ev.KEYS_ROTATED, ev.KEYS_REVOKED))
    return [e.payload["root"] for e in query.iter_entries(conn, changes)]


def wanted_roots(keyring: Keyring, store: LedgerStore) -> dict[str, bytes]:
    """What the bucket `roots` must hold (`root.<N>` for every root, `root.latest`),
    after bringing HOME up to date with the ledger: a root the ledger has but HOME
    lacks (the hub stopped between the commit and writing the file) is written."""
    with store.engine.connect() as conn:
        recorded = roots_from_ledger(conn)
    for data in recorded:
        try:
            version = proto.SignedEnvelope.decode(data).document("root")["version"]
        except (proto.ProtocolError, KeyError):
            continue
        if version not in keyring.roots():
            keyring.store_root(data)
    roots = keyring.roots()
    out = {root_key(version): roots[version] for version in sorted(roots)}
    out[ROOT_LATEST_KEY] = roots[max(roots)]  # last: a device reads root.latest first
    return out


async def publish_roots(js: JetStreamContext, keyring: Keyring, store: LedgerStore,
                        replicas: int = 1) -> None:
    """Bring HOME and the KV bucket `roots` up to date with the ledger, at hub start
    (a new bucket gets `replicas`; an existing one is scaled by
    hub.service.nats.allow_fleet_consumers)."""
    try:
        kv = await js.key_value(ROOTS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        kv = await js.create_key_value(KeyValueConfig(bucket=ROOTS_BUCKET, history=1,
                                                      direct=True, replicas=replicas))
    for key, data in wanted_roots(keyring, store).items():
        await kv.put(key, data)


async def put_root(js: JetStreamContext, data: bytes) -> None:
    """Publish one new root: `root.<N>` first, then `root.latest`."""
    version = proto.SignedEnvelope.decode(data).document("root")["version"]
    kv = await js.key_value(ROOTS_BUCKET)
    await kv.put(root_key(int(version)), data)
    await kv.put(ROOT_LATEST_KEY, data)
