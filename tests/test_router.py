"""The verb router, offline: every verb the envelope knows has exactly one handler, and
the nonces of read commands are held only as long as a replay could be accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.commands.envelope import MAX_CLOCK_SKEW_NS, READ_VERBS, VERB_ROLES, sign_command
from hub.errors import Refused
from hub.home.config import init_home
from hub.service.app import HubService
from ledger.signing import SigningKey


@pytest.fixture
def hub(tmp_path: Path) -> HubService:
    return HubService(init_home(tmp_path / "hub", "nats://127.0.0.1:1"))


def test_the_verb_registry_is_every_write_verb_and_every_read_verb(hub: HubService) -> None:
    try:
        assert hub.router.verbs == set(VERB_ROLES) | READ_VERBS
        assert not set(hub.router.reads) & set(VERB_ROLES)
    finally:
        hub.store.close()


async def test_read_nonces_are_dropped_once_their_command_would_be_stale(
        hub: HubService) -> None:
    try:
        await hub.bootstrap_admin()
        admin = SigningKey.load(hub.config.operator_key_path("admin"))
        now = [10**18]
        hub.router.clock = lambda: now[0]
        first = sign_command(admin, "whoami", {}, now=now[0], audience=hub.config.origin)
        assert (await hub.router.handle("whoami", first))["name"] == "admin"
        with pytest.raises(Refused, match="replayed"):
            await hub.router.handle("whoami", first)
        assert hub.router.read_nonces() == 1
        # Past the freshness window the first command is refused as stale anyway, so
        # its nonce is no longer held.
        now[0] += MAX_CLOCK_SKEW_NS + 1
        await hub.router.handle("whoami", sign_command(admin, "whoami", {}, now=now[0],
                                                       audience=hub.config.origin))
        assert hub.router.read_nonces() == 1
        with pytest.raises(Refused, match="stale"):
            await hub.router.handle("whoami", first)
    finally:
        hub.store.close()


async def test_an_unknown_verb_is_refused_with_the_known_ones(hub: HubService) -> None:
    try:
        with pytest.raises(Refused, match=r"unknown command 'nope'; known: .*deploy"):
            await hub.router.handle("nope", b"")
    finally:
        hub.store.close()
