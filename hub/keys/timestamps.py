"""The signed timestamp (TUF's timestamp role): the hub's short-lived word that the
newest trust root is the one it names, so a device notices a freeze.

Without it nothing told a device that `root.latest` was current: a device kept away
from the hub (or shown an old copy of the `roots` bucket) through a director-key
revocation still trusted the revoked key and installed what it signed. Now the hub
signs, with the `timestamp` role's keys of its newest root, a small document
(edge_agent.protocol.Timestamp: version, root version, the root's BLAKE3 digest, issued,
expires) and puts it in the `roots` bucket under `timestamp`. A device installs nothing
new without an unexpired timestamp that names the root it holds
(edge_agent.update.check_timestamp).

`TimestampPublisher.run` is a supervised hub task: it signs a new timestamp when half
of the lifetime (`timestamp_ttl_seconds`, 1 h by default) is left, when the root changes
(`RootChanges` calls `publish` right after a new root is published) and at start. The
reconciler (hub/service/reconcile.py) calls `restore` so a deleted or overwritten
timestamp is put back. The newest one is kept in HOME/timestamp.bin: its `version` only
grows, across restarts too (devices refuse a lower one).

The timestamp key stays online on the hub, like the director key: it can only vouch for
the roots the hub already holds, and it is rotated and revoked through the root chain
like any role key (`hub keys rotate timestamp`, `hub keys revoke KEYID`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import blake3
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from edge_agent import protocol as proto
from edge_agent.protocol.names import ROOTS_BUCKET, TIMESTAMP_KEY
from hub.clock import Clock
from hub.keys.keyring import Keyring
from ledger.durable import atomic_write

log = logging.getLogger("hub.timestamp")

TIMESTAMP_ROLE = "timestamp"
TIMESTAMP_FILE = "timestamp.bin"
RENEW_WHEN_LEFT = 1 / 2  # sign a new timestamp when less than this share of its life is left


def read_timestamp(data: bytes) -> proto.Timestamp:
    """The document of a signed timestamp (unverified: the hub's own file)."""
    envelope = proto.SignedEnvelope.decode(data, "timestamp")
    return proto.Timestamp.from_map(envelope.document(proto.DOMAIN_TIMESTAMP))


class TimestampPublisher:
    def __init__(self, keyring: Keyring, js: Callable[[], JetStreamContext], clock: Clock,
                 ttl_s: float, home: Path) -> None:
        self.keyring = keyring
        self.js = js
        self.clock = clock
        self.ttl_ns = int(ttl_s * 1e9)
        self.path = home / TIMESTAMP_FILE
        self.current: bytes | None = None
        self.stamp: proto.Timestamp | None = None
        with contextlib.suppress(FileNotFoundError, proto.ProtocolError):
            data = self.path.read_bytes()
            self.stamp, self.current = read_timestamp(data), data
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._warned = False

    @property
    def enabled(self) -> bool:
        """False for a root without a timestamp role (a home made before it existed:
        `hub keys rotate timestamp` adds it); its devices ask for no timestamp."""
        enabled = TIMESTAMP_ROLE in self.keyring.root.roles
        if not enabled and not self._warned:
            self._warned = True
            log.warning("trust root %d has no timestamp role: devices cannot notice a "
                        "frozen root; add one with `hub keys rotate timestamp`",
                        self.keyring.root.version)
        return enabled

    def due(self, now_ns: int) -> bool:
        """A new timestamp is needed: none yet, the root changed, or its life runs out."""
        stamp, root = self.stamp, self.keyring.root
        if stamp is None or stamp.root_version != root.version:
            return True
        if stamp.root_digest != blake3.blake3(root.envelope.encode()).hexdigest():
            return True
        return now_ns >= stamp.expires - int((stamp.expires - stamp.issued) * RENEW_WHEN_LEFT)

    def sign(self, now_ns: int) -> bytes:
        root = self.keyring.root
        version = (self.stamp.version if self.stamp is not None else 0) + 1
        doc = proto.Timestamp(
            version=version, root_version=root.version,
            root_digest=blake3.blake3(root.envelope.encode()).hexdigest(),
            issued=now_ns, expires=now_ns + self.ttl_ns)
        return proto.SignedEnvelope.sign(doc.to_map(), proto.DOMAIN_TIMESTAMP,
                                         self.keyring.signers(TIMESTAMP_ROLE)).encode()

    async def publish(self) -> bool:
        """Sign a new timestamp if one is due (kept in HOME first, then put in KV);
        True if it signed one."""
        if not self.enabled:
            return False
        async with self._lock:
            now = self.clock.wall_ns()
            if not self.due(now):
                return False
            data = self.sign(now)
            atomic_write(self.path, data)  # before KV: the version never goes back
            self.stamp, self.current = read_timestamp(data), data
            await self._put(data)
        log.info("timestamp %d signed (trust root %d, expires in %.0f s)", self.stamp.version,
                 self.stamp.root_version, self.ttl_ns / 1e9)
        return True

    async def restore(self) -> bool:
        """Put the current timestamp back if KV lacks it or holds another (the
        reconciler); sign one first if due. True if it wrote."""
        if not self.enabled:
            return False
        if await self.publish():
            return True
        async with self._lock:
            if self.current is None:
                return False
            kv = await self.js().key_value(ROOTS_BUCKET)
            try:
                have = (await kv.get(TIMESTAMP_KEY)).value
            except KeyNotFoundError:
                have = None
            if have == self.current:
                return False
            await self._put(self.current)
        log.warning("restored the timestamp KV lacked or held otherwise")
        return True

    async def _put(self, data: bytes) -> None:
        await (await self.js().key_value(ROOTS_BUCKET)).put(TIMESTAMP_KEY, data)

    def nudge(self) -> None:
        self._wake.set()

    async def root_changed(self) -> None:
        """A new root was published: name it at once (devices hold back until then)."""
        await self.publish()

    async def run(self) -> None:
        """Sign again well before expiry, for ever. A failed put (NATS down) is retried
        with backoff, one log line when it starts failing and one when it works again:
        an outage must not end the hub (the devices' old timestamp is still valid)."""
        backoff, failing = 0.5, ""
        while True:
            try:
                await self.restore()  # a put that failed before is made now
                if failing:
                    log.info("timestamp publishing works again")
                failing, backoff = "", 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("cannot publish the timestamp (%s); retrying", exc)
                failing = str(exc) or type(exc).__name__
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            wait = self.ttl_ns * RENEW_WHEN_LEFT / 1e9
            if self.stamp is not None:
                renew_at = self.stamp.expires - int(
                    (self.stamp.expires - self.stamp.issued) * RENEW_WHEN_LEFT)
                wait = max(0.1, (renew_at - self.clock.wall_ns()) / 1e9)
            self._wake.clear()
            # At most a minute: a root changed by other means (a restart's catch-up from
            # the ledger) is named within that, with no I/O while nothing is due.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(wait, 60.0))
