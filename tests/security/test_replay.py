"""Replay (issue 12, class 7), tried for real on nats-servers with the configuration
`hub init` writes: a signed operator command replayed on another hub, signed commands
replayed after a hub restart, a signed status report from an earlier boot replayed.
Each attack must be refused and change nothing: the ledger head, `ledger verify`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hub.client import HubClient
from hub.commands.envelope import sign_command
from hub.home.config import init_home, set_nats_url
from hub.home.nats_config import server_conf_path
from hub.service.app import HubService
from ledger.encoding import canonical_decode
from ledger.signing import SigningKey
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet, ledger_state

pytestmark = pytest.mark.timeout(120)
WAIT = 20.0


async def send(client: HubClient, verb: str, data: bytes) -> dict[str, Any]:
    """A raw request on `hub.api.<verb>`, as an attacker holding `data` would send it."""
    msg = await client.nc.request("hub.api." + verb, data, timeout=WAIT)
    reply: dict[str, Any] = canonical_decode(msg.data)
    return reply


@pytest.fixture
async def hub_b(tmp_path: Path) -> AsyncIterator[Fleet]:
    """A second hub, with its own home and its own nats-server."""
    home = init_home(tmp_path / "b" / "hub", "nats://127.0.0.1:4222")
    server = EmbeddedNats(store_dir=tmp_path / "b" / "nats",
                          config_file=server_conf_path(home.home)).start()
    set_nats_url(home.home, server.url)
    fleet = await Fleet(tmp_path / "b", server.url).start()
    try:
        yield fleet
    finally:
        await fleet.stop()
        server.close()


async def test_a_command_signed_for_one_hub_is_refused_by_another(
        fleet: Fleet, hub_b: Fleet) -> None:
    # The same person is an admin on both hubs (one key).
    alice = fleet.admin_key
    async with await hub_b.client() as b_admin:
        await b_admin.call("operator.add", {"name": "alice", "public": alice.public.raw,
                                            "roles": ["admin", "operator"]})
    assert fleet.config.origin != hub_b.config.origin
    body = {"device": "dev-x"}
    for_a = sign_command(alice, "device.enroll", body, audience=fleet.config.origin)
    names_no_hub = sign_command(alice, "device.enroll", body, audience=None)
    read_for_a = sign_command(alice, "devices", {}, audience=fleet.config.origin)
    before = ledger_state(hub_b)
    async with await hub_b.client(alice) as on_b:
        refused = await send(on_b, "device.enroll", for_a)
        assert refused["ok"] is False and "signed for hub" in refused["error"], refused
        read = await send(on_b, "devices", read_for_a)
        assert read["ok"] is False and "signed for hub" in read["error"], read
        old = await send(on_b, "device.enroll", names_no_hub)
        assert old["ok"] is False and "upgrade" in old["error"], old
        assert await on_b.devices() == []  # the client learnt B's audience itself
    assert ledger_state(hub_b) == before and hub_b.hub.store.verify().ok
    async with await fleet.client() as on_a:  # on its own hub the command works
        accepted = await send(on_a, "device.enroll", for_a)
        assert accepted["ok"] is True, accepted


async def test_signed_commands_are_refused_after_a_hub_restart(fleet: Fleet) -> None:
    admin, hub = fleet.admin_key, fleet.config.origin
    read = sign_command(admin, "devices", {}, audience=hub)
    write = sign_command(admin, "device.enroll", {"device": "dev-r"}, audience=hub)
    # A write its handler refuses appends nothing: its nonce is not in the ledger.
    early = sign_command(admin, "device.revoke", {"device": "dev-late"}, audience=hub)
    async with await fleet.client() as client:
        assert (await send(client, "devices", read))["ok"] is True
        assert (await send(client, "device.enroll", write))["ok"] is True
        refused = await send(client, "device.revoke", early)
        assert refused["ok"] is False and "no device dev-late" in refused["error"]
    await fleet.hub.stop()
    fleet.hub = HubService(fleet.config)
    await fleet.hub.start()
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": "dev-late"})
        before = ledger_state(fleet)
        for verb, data in (("devices", read), ("device.enroll", write),
                           ("device.revoke", early)):
            reply = await send(client, verb, data)
            assert reply["ok"] is False and "replayed" in reply["error"], (verb, reply)
        assert ledger_state(fleet) == before and fleet.hub.store.verify().ok
        assert {d["device"]: d["state"] for d in await client.devices()}["dev-late"] != \
            "revoked"


def test_sign_command_without_audience_names_no_hub() -> None:
    from edge_agent.protocol import SignedEnvelope

    doc = SignedEnvelope.decode(sign_command(SigningKey.generate(), "devices", {},
                                             audience=None)).document("command")
    assert "audience" not in doc
