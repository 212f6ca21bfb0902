"""The NATS server confines every identity (hub/home/nats_config.py, docs/PROTOCOL.md
"Permissions"): a real nats-server with the configuration `hub init` writes.

A refused publish or subscribe does not fail the call in nats-py; the server answers
`-ERR 'Permissions Violation ...'`, which reaches the error callback. Each check waits
for that error (with a timeout), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from edge_agent.protocol.names import API_PREFIX, ASSIGNMENTS_BUCKET
from edge_agent.transport.connect import NatsAuth, nkey_public, nkey_seed
from edge_agent.transport.direct import KeyHints
from hub.home.config import init_home, set_nats_url
from hub.home.nats_config import server_conf_path
from ledger.signing import SigningKey
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet

WAIT = 10.0


@dataclass
class Conn:
    """A client connection that records the server's permission errors."""

    nc: NATS
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def open(cls, url: str, auth: NatsAuth, name: str = "test") -> Conn:
        conn = cls(NATS())

        async def on_error(exc: Exception) -> None:
            conn.errors.append(str(exc))
            conn.changed.set()

        await conn.nc.connect(url, name=name, error_cb=on_error, allow_reconnect=False,
                              connect_timeout=5, **auth.options())
        return conn

    async def refused(self, what: str, action: Awaitable[object]) -> None:
        """Run `action`; wait until the server reports a permissions violation naming
        `what` (the action itself may hang, waiting for a reply that never comes)."""
        task = asyncio.ensure_future(action)

        async def until() -> None:
            while not any("permissions violation" in e.lower() and what.lower() in e.lower()
                          for e in self.errors):  # nats-py lower-cases the server's text
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(until(), WAIT)
        except TimeoutError:
            raise AssertionError(f"no permissions violation for {what}; errors: "
                                 f"{self.errors}; action: {task}") from None
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.close(), 5)


def device_auth(fleet: Fleet, device: str) -> NatsAuth:
    key = SigningKey.load(fleet.bundle(device) / "device.key")
    return NatsAuth.for_device(device, key.private_raw())


async def connect_device(fleet: Fleet, device: str) -> Conn:
    """Connect with the device's bundle key. The server reloads its users file just
    after enrolment, so an attempt may be refused (not there yet) or reset (a handshake
    during the reload): retry those until WAIT, as edge_agent.nats_auth.connect does."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        try:
            return await Conn.open(fleet.nats_url, device_auth(fleet, device), device)
        except (NatsError, ConnectionResetError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.fixture
async def two_devices(fleet: Fleet) -> AsyncIterator[tuple[Fleet, Conn]]:
    """dev-a and dev-b enrolled, each with an assignment in KV; dev-a connected."""
    async with await fleet.client() as admin:
        for device in ("dev-a", "dev-b"):
            await admin.call("device.enroll", {"device": device})
    kv = await fleet.hub.edge.js.key_value(ASSIGNMENTS_BUCKET)
    await kv.put("dev-a", b"assignment of dev-a")
    await kv.put("dev-b", b"assignment of dev-b")
    conn = await connect_device(fleet, "dev-a")
    try:
        yield fleet, conn
    finally:
        await conn.close()


def test_the_device_key_is_its_nkey() -> None:
    import nkeys

    key = SigningKey.generate()
    pair = nkeys.from_seed(bytearray(nkey_seed(key.private_raw()).encode()))
    assert pair.public_key.decode() == nkey_public(key.public.raw)


async def test_a_device_reads_its_own_assignment_and_not_anothers(
    two_devices: tuple[Fleet, Conn],
) -> None:
    _, a = two_devices
    own = await KeyHints.start(a.nc, ASSIGNMENTS_BUCKET, "dev-a")
    try:
        assert await own.updates(WAIT) == b"assignment of dev-a"
    finally:
        await own.stop()
    # Every way to read dev-b's key: a direct get, its hints, a stream message get, a
    # consumer (filtered, or unfiltered as nats-py's kv.watch sends it).
    await a.refused("DIRECT.GET.KV_assignments",
                    a.nc.request("$JS.API.DIRECT.GET.KV_assignments.$KV.assignments.dev-b",
                                 b"", timeout=2))
    await a.refused("DIRECT.GET.KV_assignments",  # the form with a body names any key
                    a.nc.request("$JS.API.DIRECT.GET.KV_assignments",
                                 b'{"last_by_subj": "$KV.assignments.dev-b"}', timeout=2))
    await a.refused("$KV.assignments.dev-b", a.nc.subscribe("$KV.assignments.dev-b"))
    await a.refused("$KV.assignments.*", a.nc.subscribe("$KV.assignments.*"))
    await a.refused("STREAM.MSG.GET.KV_assignments",
                    a.nc.request("$JS.API.STREAM.MSG.GET.KV_assignments", b"", timeout=2))
    await a.refused("CONSUMER.CREATE.KV_assignments",
                    a.nc.request("$JS.API.CONSUMER.CREATE.KV_assignments.w.$KV.assignments."
                                 "dev-b", b"{}", timeout=2))
    # Nor can it listen to replies meant for others (its inbox is _INBOX.dev-a.>).
    await a.refused("_INBOX.>", a.nc.subscribe("_INBOX.>"))


async def test_a_device_publishes_only_its_own_reports_and_writes_no_kv(
    two_devices: tuple[Fleet, Conn],
) -> None:
    fleet, a = two_devices
    js = a.nc.jetstream(timeout=2)
    ack = await js.publish("fleet.report.dev-a.telemetry", b"\x80")  # its own: accepted
    assert ack.stream == "REPORTS"
    await a.refused("fleet.report.dev-b.status", js.publish("fleet.report.dev-b.status", b"x"))
    await a.refused("fleet.report.dev-b.telemetry", a.nc.publish("fleet.report.dev-b.telemetry"))
    await a.refused("$KV.assignments.dev-a", js.publish("$KV.assignments.dev-a", b"mine now"))
    await a.refused("$KV.roots.latest", js.publish("$KV.roots.latest", b"evil root"))
    await a.refused("$KV.manifests.kws.9", js.publish("$KV.manifests.kws.9", b"evil"))
    await a.refused("$O.models.C.", js.publish("$O.models.C.abc", b"evil chunk"))
    await a.refused("fleet.report.>", a.nc.subscribe("fleet.report.>"))
    kv = await fleet.hub.edge.js.key_value(ASSIGNMENTS_BUCKET)
    assert (await kv.get("dev-a")).value == b"assignment of dev-a"


async def test_a_device_cannot_call_the_operator_or_ledger_api(
    two_devices: tuple[Fleet, Conn],
) -> None:
    _, a = two_devices
    await a.refused(API_PREFIX + "status", a.nc.request(API_PREFIX + "status", b"", timeout=2))
    await a.refused(API_PREFIX + "device.enroll",
                    a.nc.request(API_PREFIX + "device.enroll", b"", timeout=2))
    await a.refused("$JS.API.STREAM.DELETE.KV_assignments",
                    a.nc.request("$JS.API.STREAM.DELETE.KV_assignments", b"", timeout=2))


async def test_an_operator_uses_the_api_but_cannot_write_assignments_or_forge_reports(
    fleet: Fleet,
) -> None:
    op = await Conn.open(fleet.nats_url, fleet.config.operator_auth(fleet.admin_key), "admin")
    try:
        js = op.nc.jetstream(timeout=2)
        await op.refused("$KV.assignments.dev-x", js.publish("$KV.assignments.dev-x", b"x"))
        await op.refused("fleet.report.dev-x.status", op.nc.publish("fleet.report.dev-x.status"))
        await op.refused("fleet.report.>", op.nc.subscribe("fleet.report.>"))
        # Replies to other operators (and devices) are not its to read.
        await op.refused("_INBOX.>", op.nc.subscribe("_INBOX.>"))
    finally:
        await op.close()
    # Without any credentials nobody gets in.
    with pytest.raises(NatsError):
        await nats.connect(fleet.nats_url, allow_reconnect=False, connect_timeout=2)


async def test_each_operator_is_its_own_nats_user_and_a_revoked_one_is_shut_out(
    fleet: Fleet,
) -> None:
    """An operator's key is its NATS nkey: `hub operator add` lets it in (by the time the
    command returns), an unknown key is refused, `hub operator revoke` closes its
    connection and keeps it out; the other operators are unaffected."""
    bob = SigningKey.generate()
    with pytest.raises(NatsError):  # not an operator yet
        await Conn.open(fleet.nats_url, fleet.config.operator_auth(bob), "bob")
    async with await fleet.client() as admin:
        await admin.call("operator.add", {"name": "bob", "public": bob.public.raw,
                                          "roles": ["operator"]})
        async with await fleet.client(bob) as client:  # in at once, and it works
            assert (await client.call("whoami"))["name"] == "bob"
            closed = asyncio.Event()
            client.nc._closed_cb = _set_event(closed)  # nats-py has no setter
            await admin.call("operator.revoke", {"name": "bob", "reason": "left"})
            await asyncio.wait_for(closed.wait(), WAIT)
        with pytest.raises(NatsError):
            await Conn.open(fleet.nats_url, fleet.config.operator_auth(bob), "bob")
        assert (await admin.call("whoami"))["name"] == "admin"
    users = (fleet.config.home / "nats" / "users.conf").read_text()
    assert f"operator key {fleet.admin_key.keyid}" in users and bob.keyid not in users
    assert 'user: "operator"' not in users  # no shared operator password any more


async def test_a_revoked_device_is_disconnected_refused_and_its_reports_ignored(
    two_devices: tuple[Fleet, Conn],
) -> None:
    fleet, a = two_devices
    closed = asyncio.Event()
    a.nc._closed_cb = _set_event(closed)  # nats-py has no setter
    async with await fleet.client() as admin:
        result = await admin.call("device.revoke", {"device": "dev-a", "reason": "stolen"})
        assert result["reloaded"] is True
        with pytest.raises(Exception, match="already revoked"):
            await admin.call("device.revoke", {"device": "dev-a"})
        rows = {r["device"]: r for r in await admin.devices()}
        assert rows["dev-a"]["state"] == "revoked"
    await fleet.feed.wait_for(lambda es: any(e.kind == "device.revoked" for e in es),
                              what="device.revoked")
    # The reload closes its live connection, and it cannot connect again.
    await asyncio.wait_for(closed.wait(), WAIT)
    with pytest.raises(NatsError):
        await Conn.open(fleet.nats_url, device_auth(fleet, "dev-a"), "dev-a")
    # dev-b is unaffected.
    b = await connect_device(fleet, "dev-b")
    await b.close()


def _set_event(event: asyncio.Event) -> object:
    async def cb() -> None:
        event.set()
    return cb


async def test_with_tls_a_plain_client_is_refused_and_the_ca_lets_clients_in(
    tmp_path: Path,
) -> None:
    config = init_home(tmp_path / "tls-hub", "nats://127.0.0.1:4222", tls=True)
    with EmbeddedNats(store_dir=tmp_path / "tls-nats",
                      config_file=server_conf_path(config.home)) as server:
        set_nats_url(config.home, server.url)
        # `hub init` lets the first admin in before the hub ever ran.
        auth = config.operator_auth(SigningKey.load(config.operator_key_path("admin")))
        assert auth.ca_file is not None and auth.nkey_seed is not None
        plain = dataclasses.replace(auth, ca_file=None)
        with pytest.raises(Exception):  # noqa: B017 - nats-py raises several kinds here
            await nats.connect(server.url, allow_reconnect=False, connect_timeout=2,
                               **plain.options())
        nc = await nats.connect(server.url.replace("nats://", "tls://"), allow_reconnect=False,
                                connect_timeout=5, **auth.options())
        try:
            assert nc.is_connected
            await nc.flush()
        finally:
            await nc.close()


async def test_ledger_cli_signs_in_over_tls_with_the_hubs_ca(tmp_path: Path) -> None:
    """`ledger tail --follow --nats tls://...` as a witness: user, password file and
    --nats-ca; without the CA the TLS handshake fails with a one-line error."""
    import sys

    config = init_home(tmp_path / "tls-hub", "nats://127.0.0.1:4222", tls=True)
    auth = config.nats_auth("witness")
    assert auth.ca_file is not None and auth.password
    secret = tmp_path / "password"
    secret.write_text(auth.password)
    with EmbeddedNats(store_dir=tmp_path / "tls-nats",
                      config_file=server_conf_path(config.home)) as server:
        url = server.url.replace("nats://", "tls://")
        base = [sys.executable, "-m", "ledger.cli", "tail", "--follow", "--nats", url,
                "--nats-user", "witness", "--nats-password-file", str(secret)]
        refused = await asyncio.create_subprocess_exec(
            *base, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(refused.communicate(), 60)
        assert refused.returncode == 2, err
        assert err.decode().startswith("error: cannot reach NATS") and b"Traceback" not in err
        proc = await asyncio.create_subprocess_exec(
            *base, "--nats-ca", str(auth.ca_file),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        try:
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert b"following ledger.entry" in line, line
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


@pytest.mark.timeout(60)
async def test_an_operator_stages_uploads_through_its_import_twice(fleet: Fleet,
                                                                  tmp_path: Path) -> None:
    """The operator's upload (hub.client.HubClient.upload: plain JetStream publishes to
    its own `upload.<keyid>.<id>`, the UPLOADS stream's PubAck coming back through the
    service import, hub.home.nats_config.UPLOAD_SERVICE) works from the OPERATORS
    account, with no JetStream API import at all; two uploads of one file are two
    staged uploads, each whole."""
    from edge_agent.protocol.names import UPLOAD_CHUNK_BYTES, UPLOADS_STREAM, upload_subject

    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"a model " * 40_000)
    async with await fleet.client() as admin:
        first = await admin.upload(blob)
        second = await admin.upload(blob)
        keyid = admin.key.keyid
    assert (first.digest, first.size) == (second.digest, second.size)
    assert first.upload_id != second.upload_id
    chunks = (first.size + UPLOAD_CHUNK_BYTES - 1) // UPLOAD_CHUNK_BYTES
    for staged in (first, second):
        info = await fleet.hub.edge.js.stream_info(
            UPLOADS_STREAM, subjects_filter=upload_subject(keyid, staged.upload_id))
        assert info.state.subjects == {upload_subject(keyid, staged.upload_id): chunks}
