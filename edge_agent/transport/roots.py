"""The agent's side of trust-root rotation: fetch newer roots from NATS, walk, persist.

The device starts from the root pinned at enrolment (`--trust-root`, or the bundle's)
or from the newest root it accepted before (STATE/trust-root.bin, replaced atomically),
whichever is newer. `refresh` reads `root.latest` from the KV bucket `roots`, fetches
`root.<N+1>` ... `root.<latest>` and hands them to the pure chain walk
(edge_agent.trust.chain.walk_chain). What verified is kept, even when a later step is
refused; a refusal is returned (once per distinct root) so the agent reports it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import blake3

from edge_agent.errors import ProtocolError
from edge_agent.protocol.documents import SignedEnvelope
from edge_agent.transport import UpdateSource
from edge_agent.trust.chain import (
    MAX_CHAIN_STEPS,
    RootRotationError,
    peek_version,
    verify_next_root,
    walk_chain,
)
from edge_agent.trust.root import TrustError, TrustRoot
from ledger.durable import atomic_write

log = logging.getLogger("edge_agent.roots")

STORED_ROOT_NAME = "trust-root.bin"


class RootUpdater:
    def __init__(self, pinned: Path, state_dir: Path) -> None:
        self.path = state_dir / STORED_ROOT_NAME
        self.trust = TrustRoot.load(pinned)
        stored = self._load_stored()
        if stored is not None and stored.version > self.trust.version:
            self.trust = stored
        self._lock = asyncio.Lock()
        self._reported: set[str] = set()

    def _load_stored(self) -> TrustRoot | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            # It verified when it was stored; it may have expired while the device was
            # off, which a newer root from the hub fixes.
            return TrustRoot.from_envelope(SignedEnvelope.decode(data, "trust root"),
                                           allow_expired=True)
        except (ProtocolError, TrustError) as exc:
            log.warning("stored trust root %s is unusable (%s); using the pinned one",
                        self.path, exc)
            return None

    def _adopt(self, root: TrustRoot) -> None:
        if root.version <= self.trust.version:
            return
        atomic_write(self.path, root.envelope.encode())
        log.info("trust root version %d accepted (was %d)", root.version, self.trust.version)
        self.trust = root

    async def refresh(self, source: UpdateSource) -> str | None:
        """Walk to the newest root published; the reason if a root was refused (new ones
        only: the same bad root is reported once)."""
        async with self._lock:
            latest = await source.latest_root()
            if latest is None:
                return None  # no rotation published (or an older hub)
            try:
                claimed = peek_version(latest)
            except TrustError as exc:
                return self._refusal(latest, f"trust root refused: {exc}")
            current = self.trust.version
            if claimed == current:
                return None
            if claimed < current:
                try:
                    verify_next_root(self.trust, latest)
                except TrustError as exc:
                    return self._refusal(latest, f"trust root refused: {exc}")
                return None
            newer: dict[int, bytes] = {}
            for version in range(current + 1, min(claimed, current + MAX_CHAIN_STEPS) + 1):
                if version == claimed:
                    newer[version] = latest
                    break
                data = await source.root(version)
                if data is None:
                    break  # the walk stops at the gap; the refusal names the version
                newer[version] = data
            try:
                root = walk_chain(self.trust, newer)
            except RootRotationError as exc:
                self._adopt(exc.accepted)
                bad = newer.get(exc.accepted.version + 1, latest)
                return self._refusal(bad, f"trust root refused: {exc}")
            self._adopt(root)
            if root.version < claimed:
                return self._refusal(latest, f"trust root refused: root {root.version + 1} "
                                             "is missing from the roots bucket")
            return None

    def _refusal(self, data: bytes, reason: str) -> str | None:
        digest = blake3.blake3(data).hexdigest()
        log.error("%s", reason)
        if digest in self._reported:
            return None
        self._reported.add(digest)
        return reason
