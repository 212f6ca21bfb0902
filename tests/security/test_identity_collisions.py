"""Identity collisions and unconfirmed reloads (issue 12, class 4), on a real
nats-server with the configuration `hub init` writes: a key used twice is refused
before it reaches the users file, and a change the server did not take is reported
as a failure, never as "reloaded"."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from hub.errors import HubError
from hub.home.nats_check import NatsReloadUnconfirmed, NatsUsersRefused
from hub.home.nats_config import USERS_CONF, nats_dir, server_conf_path, write_users
from hub.home.nats_users import apply_nats_users
from ledger.signing import SigningKey
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet, ledger_state, refused

pytestmark = pytest.mark.timeout(120)


def users_file(fleet: Fleet) -> bytes:
    return (nats_dir(fleet.config.home) / USERS_CONF).read_bytes()


async def test_a_device_key_used_twice_is_refused(fleet: Fleet) -> None:
    async with await fleet.client() as admin:
        await admin.call("device.enroll", {"device": "dev-1"})
        dev1 = SigningKey.load(fleet.bundle("dev-1") / "device.key")
        before = users_file(fleet)
        message = await refused(fleet, admin, "device.enroll",
                                {"device": "dev-2", "public": dev1.public.raw},
                                "already the key of device dev-1")
        assert "key of its own" in message
        # An operator's key as a device key, and a device's key as an operator key.
        await refused(fleet, admin, "device.enroll",
                      {"device": "dev-3", "public": fleet.admin_key.public.raw},
                      "already the key of operator admin")
        await refused(fleet, admin, "operator.add",
                      {"name": "mallory", "public": dev1.public.raw, "roles": ["auditor"]},
                      "already the key of device dev-1")
        assert users_file(fleet) == before
        # The server still takes identity changes: a new device gets in.
        await admin.call("device.enroll", {"device": "dev-4"})
        assert users_file(fleet) != before


async def test_a_users_file_nats_server_refuses_is_not_written(fleet: Fleet) -> None:
    home = fleet.config.home
    before = users_file(fleet)
    twice = SigningKey.generate().public.raw
    with pytest.raises(NatsUsersRefused, match="Duplicate nkey"):
        write_users(home, [("dev-a", twice), ("dev-b", twice)])
    assert users_file(fleet) == before


async def test_a_change_the_server_does_not_take_is_reported_as_a_failure(
        fleet: Fleet, nats_server: EmbeddedNats) -> None:
    conf = server_conf_path(fleet.config.home)
    text = conf.read_text()
    before_users = users_file(fleet)
    conf.write_text(text + "this is not { valid\n")  # the server config broken on purpose
    try:
        async with await fleet.client() as admin:
            before = ledger_state(fleet)
            with pytest.raises(HubError, match="refuses the new NATS users file"):
                await admin.call("device.enroll", {"device": "dev-5"})
            # The ledger has the enrolment; the users file was left as it was.
            assert fleet.hub.store.count() == before[0] + 1 and fleet.hub.store.verify().ok
            assert users_file(fleet) == before_users
    finally:
        conf.write_text(text)
    # A server that does not reload (stopped here) is not answered "reloaded".
    process = nats_server.process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(NatsReloadUnconfirmed, match="did not take"):
            await asyncio.to_thread(
                apply_nats_users, fleet.config, [("dev-6", SigningKey.generate().public.raw)],
                [(fleet.admin_key.keyid, fleet.admin_key.public.raw)])
    finally:
        os.kill(process.pid, signal.SIGCONT)
