"""Replay (issue 12, class 7), tried for real on nats-servers with the configuration
`hub init` writes: a signed operator command replayed on another hub, signed commands
replayed after a hub restart, a signed status report from an earlier boot replayed.
Each attack must be refused and change nothing: the ledger head, `ledger verify`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent import protocol as proto
from edge_agent.boots import next_boot
from edge_agent.reporter import Reporter
from edge_agent.spool import Spool
from hub import events as ev
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


def status_from_boot(state: Path, device: str, key: SigningKey) -> tuple[str, str, bytes]:
    """Start the agent's reporter on `state` (a new boot, as `edge-agent run` does) and
    have it spool one signed status report: (subject, message id, data)."""
    reporter = Reporter(device, next_boot(state), Spool(state / "spool"), key)
    reporter.status(proto.STATUS_APPLIED, "", {"model": "kws", "version": "1",
                                               "digest": "ab" * 32, "counter": 1},
                    probe_output=[0.5])
    record = reporter.spool.peek()
    assert record is not None
    reporter.spool.ack(record)
    return record.subject, record.msg_id, record.data


async def test_a_status_report_of_an_earlier_boot_is_refused(
        fleet: Fleet, tmp_path: Path) -> None:
    async with await fleet.client(role="hub") as client:
        await client.call("device.enroll", {"device": "dev-1"})
        key = SigningKey.load(fleet.bundle("dev-1") / "device.key")
        js = client.nc.jetstream()
        state = tmp_path / "dev-1-state"
        state.mkdir()

        async def appended(n: int) -> None:
            await fleet.feed.wait_for(
                lambda _: len(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, "dev-1")) >= n,
                WAIT, f"{n} applied reports")

        subject, msg_id, captured = status_from_boot(state, "dev-1", key)  # boot 1
        await js.publish(subject, captured, headers={"Nats-Msg-Id": msg_id})
        await appended(1)
        subject, msg_id, data = status_from_boot(state, "dev-1", key)  # boot 2
        await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
        await appended(2)
        boots = [proto.decode_signed_report(e.payload["report"])[0].boot
                 for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, "dev-1")]
        assert [proto.boot_counter(b) for b in boots] == sorted(
            proto.boot_counter(b) or 0 for b in boots)
        before = ledger_state(fleet)
        status = await client.call("status")
        refused = status["refused_by_reason"].get("replay", 0)
        # The captured boot-1 report again, with a new message id (past JetStream's
        # de-duplication), and one of an agent older than boot counters.
        old_agent = proto.StatusReport(
            device="dev-1", boot="deadbeef", seq=99, ts=time.time_ns(),
            event=proto.STATUS_APPLIED, model="kws", version="1", digest="ab" * 32,
            counter=1, reason="", probe_output=[0.5])
        await js.publish(subject, captured, headers={"Nats-Msg-Id": "replay-1"})
        await js.publish(subject, proto.encode_signed_report(old_agent, key),
                         headers={"Nats-Msg-Id": "replay-2"})

        async def counted() -> dict[str, int]:
            while True:
                reasons: dict[str, int] = (await client.call("status"))["refused_by_reason"]
                if reasons.get("replay", 0) >= refused + 2:
                    return reasons
                await asyncio.sleep(0.05)

        await asyncio.wait_for(counted(), WAIT)
        assert ledger_state(fleet) == before and fleet.hub.store.verify().ok
