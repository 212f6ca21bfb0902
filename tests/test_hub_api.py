"""The hub's operator API and report intake refuse bad input and keep serving.

Real nats-server, real hub (in this process via the `fleet` fixture, or as a
`hub serve` child process where the input could take the whole process down), real
SQLite ledger. Every refusal is checked three ways: a clear message, nothing
appended to the ledger (count and head hash unchanged), and the hub still answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import pytest
from nats.js.errors import KeyNotFoundError

from edge_agent import protocol as proto
from edge_agent.protocol import SignedEnvelope
from edge_agent.protocol.names import ASSIGNMENTS_BUCKET
from edge_agent.transport.connect import NatsAuth
from edge_agent.transport.connect import connect as nats_connect
from hub import events as ev
from hub.client import HubClient
from hub.commands.envelope import sign_command
from hub.errors import HubError
from hub.home.config import HubConfig, load_config
from ledger.encoding import canonical_decode, canonical_encode
from ledger.signing import SigningKey
from ledger.storage.store import LedgerStore
from testkit.nats_server import EmbeddedNats
from tests.fleet import REPO_ROOT, Fleet, ledger_state, refused

WAIT = 20.0  # seconds any one awaited event may take before the test fails


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[HubClient]:
    # As the hub's NATS user: these tests also publish raw reports and read KV.
    async with await fleet.client(role="hub") as c:
        yield c


async def poll(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    async def until() -> Any:
        while not (result := await check()):
            await asyncio.sleep(0.05)
        return result

    try:
        return await asyncio.wait_for(until(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}") from None


async def wait_refused(client: HubClient, at_least: int, timeout: float = WAIT) -> int:
    async def check() -> int:
        count = int((await client.call("status"))["refused_reports"])
        return count if count >= at_least else 0

    return int(await poll(check, timeout, f"refused_reports to reach {at_least}"))


def status_report(device: str, key: SigningKey | None = None, **changes: Any) -> bytes:
    """A status report as a device sends it: signed by `key` (unsigned without one)."""
    report = proto.StatusReport(
        device=device, boot="boot-1", seq=1, ts=time.time_ns(), event=proto.STATUS_APPLIED,
        model="kws", version="1", digest="ab" * 32, counter=1, reason="",
        probe_output=[0.5],
    )
    doc = report.to_map() | changes
    if key is None:
        return canonical_encode(doc)
    return SignedEnvelope.sign(doc, proto.DOMAIN_DEVICE_REPORT, [key]).encode()


def device_key(fleet: Fleet, device: str) -> SigningKey:
    """The key `device.enroll` made for `device` (in its bundle)."""
    return SigningKey.load(fleet.bundle(device) / "device.key")


def telemetry_report(device: str, **changes: Any) -> bytes:
    now = time.time_ns()
    window = proto.TelemetryWindow(
        device=device, boot="boot-1", seq=1, model="kws", version="1", digest="ab" * 32,
        start=now, end=now + 10**9, count=10, errors=0, latency_ms_p50=1.0,
        latency_ms_p95=2.0, latency_ms_max=3.0,
    )
    return canonical_encode(window.to_map() | changes)


# ---------------------------------------------------------------- malformed requests


async def test_unknown_verb_is_refused_naming_the_known_ones(
    fleet: Fleet, client: HubClient
) -> None:
    message = await refused(fleet, client, "model.delete", {"name": "kws"},
                            "unknown command 'model.delete'")
    assert "device.enroll" in message and "deploy" in message


UNREADABLE_BODIES = [
    (b"\xc1garbage", "malformed msgpack"),
    (canonical_encode(["kws", "1"]), "expected a map"),
    (b"\x82\xa1b\x01\xa1a\x02", "sorted"),
    # An unsigned request, as the hub took them before operator signatures.
    (canonical_encode({"model": "kws", "version": "1", "all": True}), "missing field"),
]


async def test_unreadable_request_bodies_are_refused(fleet: Fleet, client: HubClient) -> None:
    before = ledger_state(fleet)
    for body, word in UNREADABLE_BODIES:
        msg = await client.nc.request("hub.api.deploy", body, timeout=WAIT)
        reply = canonical_decode(msg.data)
        assert reply["ok"] is False, reply
        assert "unsigned or malformed command" in reply["error"], reply
        assert word in reply["error"], reply
    assert ledger_state(fleet) == before
    assert (await client.call("status"))["entries"] == before[0]


MISTYPED = [
    ("device.enroll", {}, "'device'"),
    ("device.enroll", {"device": 5}, "'device'"),
    ("model.register", {"name": "kws", "version": "1", "digest": "ab"}, "'size'"),
    ("model.register", {"name": "kws", "version": "1", "digest": "ab", "size": True}, "'size'"),
    ("model.register", {"name": "kws", "version": "1", "digest": "ab", "size": -1}, "'size'"),
    ("model.register", {"name": "kws", "version": "1", "size": 5}, "'digest'"),
    ("model.register", {"name": "kws", "version": "1", "digest": "ab", "size": 5}, "'upload'"),
    ("deploy", {"version": "1", "all": True}, "'model'"),
]


async def test_missing_or_mistyped_fields_are_refused(fleet: Fleet, client: HubClient) -> None:
    for verb, body, word in MISTYPED:
        await refused(fleet, client, verb, body, "missing or invalid", word)


# ---------------------------------------------------------------- enroll


async def test_enrolling_an_invalid_device_id_is_refused(fleet: Fleet, client: HubClient) -> None:
    for device in ["dev.1", "dev-*", "dev>", "dev 1", "-dev", "x" * 65, "dev/1"]:
        await refused(fleet, client, "device.enroll", {"device": device},
                      "invalid device id", repr(device))
    assert await client.devices() == []


async def test_enrolling_a_device_id_with_a_newline_is_refused(
    fleet: Fleet, client: HubClient
) -> None:
    await refused(fleet, client, "device.enroll", {"device": "dev-1\n"}, "invalid device id")


async def test_enrolling_twice_is_refused(fleet: Fleet, client: HubClient) -> None:
    result = await client.call("device.enroll", {"device": "dev-1"})
    before = fleet.hub.store.count()
    assert result["device"] == "dev-1" and result["seq"] == [before - 1]
    await refused(fleet, client, "device.enroll", {"device": "dev-1"},
                  "dev-1 is already enrolled")
    assert [d["device"] for d in await client.devices()] == ["dev-1"]


# ---------------------------------------------------------------- register


async def test_registering_a_version_twice_is_refused(
    fleet: Fleet, client: HubClient, model_files: dict[str, Path]
) -> None:
    first = await client.register_model(model_files["1"], "kws", "1")
    assert first["state"] == "registered"
    before = ledger_state(fleet)
    with pytest.raises(HubError, match=r"kws/1 is already registered.*register a new version"):
        await client.register_model(model_files["2"], "kws", "1")
    assert ledger_state(fleet) == before
    assert [(m["name"], m["version"], m["digest"]) for m in await client.call("models")] == [
        ("kws", "1", first["digest"])
    ]


async def test_registering_a_digest_that_was_not_uploaded_is_refused(
    fleet: Fleet, client: HubClient, model_files: dict[str, Path]
) -> None:
    staged = await client.upload(model_files["1"])
    other = blake3.blake3(model_files["2"].read_bytes()).hexdigest()
    await refused(fleet, client, "model.register",
                  {"name": "kws", "version": "1", "upload": staged.upload_id, "digest": other,
                   "size": staged.size},
                  f"does not match digest {other[:16]}")


@pytest.mark.parametrize("delta", [-1, 1])
async def test_registering_with_the_wrong_size_is_refused(
    fleet: Fleet, client: HubClient, model_files: dict[str, Path], delta: int
) -> None:
    staged = await client.upload(model_files["1"])
    await refused(fleet, client, "model.register",
                  {"name": "kws", "version": "1", "upload": staged.upload_id,
                   "digest": staged.digest, "size": staged.size + delta},
                  f"the model is not {staged.size + delta} bytes")


async def test_registering_a_file_that_is_not_a_model_is_refused_and_the_hub_serves_on(
    fleet: Fleet, client: HubClient, model_files: dict[str, Path], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(random.Random(7).randbytes(4096))
    before = ledger_state(fleet)
    with pytest.raises(HubError, match="not a loadable TFLite model"):
        await client.register_model(junk, "kws", "1")
    assert ledger_state(fleet) == before
    # The same name/version is still free, and a real model registers.
    result = await client.register_model(model_files["1"], "kws", "1")
    assert result["name"] == "kws" and result["seq"] == [before[0]]
    assert fleet.hub.store.count() == before[0] + 1


async def test_registering_an_invalid_model_name_is_refused(
    fleet: Fleet, client: HubClient, model_files: dict[str, Path]
) -> None:
    staged = await client.upload(model_files["1"])
    await refused(fleet, client, "model.register",
                  {"name": "KWS.x", "version": "1", "upload": staged.upload_id,
                   "digest": staged.digest, "size": staged.size},
                  "invalid model name")


# ---------------------------------------------------------------- deploy


async def test_deploying_a_model_that_is_not_released_is_refused(
    fleet: Fleet, client: HubClient, model_files: dict[str, Path]
) -> None:
    await client.call("device.enroll", {"device": "dev-1"})
    await refused(fleet, client, "deploy", {"model": "kws", "version": "9", "all": True},
                  "kws/9 is not registered", "hub model list")
    await client.register_model(model_files["1"], "kws", "1")
    await refused(fleet, client, "deploy", {"model": "kws", "version": "1", "all": True},
                  "cannot deploy kws/1", "it is registered", "hub model validate")


async def test_deploying_to_unknown_or_no_devices_is_refused_and_writes_no_assignment(
    fleet: Fleet, client: HubClient, model_files: dict[str, Path]
) -> None:
    await fleet.release_model(model_files["1"], "kws", "1")
    await refused(fleet, client, "deploy", {"model": "kws", "version": "1", "all": True},
                  "no devices are enrolled")
    await client.call("device.enroll", {"device": "dev-1"})
    await refused(fleet, client, "deploy",
                  {"model": "kws", "version": "1", "devices": ["dev-1", "ghost"]},
                  "unknown device(s): ghost", "enroll them first")
    kv = await client.nc.jetstream().key_value(ASSIGNMENTS_BUCKET)
    with pytest.raises(KeyNotFoundError):
        await kv.get("dev-1")
    # The same deployment without the stranger goes through.
    result = await client.call("deploy", {"model": "kws", "version": "1",
                                          "devices": ["dev-1"]})
    assert result["devices"] == ["dev-1"]
    assert (await kv.get("dev-1")).value


BAD_TARGETS: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    ({}, ("at least one --device", "--all")),
    ({"devices": []}, ("at least one --device",)),
    ({"devices": [], "all": False}, ("at least one --device",)),
    ({"all": "yes"}, ("at least one --device",)),
    ({"devices": "dev-1"}, ("devices must be a list",)),
    ({"devices": ["dev-1", 3]}, ("devices must be a list",)),
]


async def test_deploying_with_neither_devices_nor_all_is_refused(
    fleet: Fleet, client: HubClient
) -> None:
    await client.call("device.enroll", {"device": "dev-1"})
    for extra, words in BAD_TARGETS:
        await refused(fleet, client, "deploy", {"model": "kws", "version": "1", **extra},
                      *words)


# ---------------------------------------------------------------- signed commands


async def test_commands_that_are_not_properly_signed_are_refused(
    fleet: Fleet, client: HubClient
) -> None:
    body = {"device": "dev-1"}
    stranger = SigningKey.generate()
    hub = fleet.config.origin
    cases = [
        (stranger, sign_command(stranger, "device.enroll", body, audience=hub),
         "unknown operator key"),
        (fleet.admin_key, sign_command(fleet.admin_key, "devices", body, audience=hub),
         "signed for 'devices'"),
        (fleet.admin_key, sign_command(fleet.admin_key, "device.enroll", body,
                                       now=time.time_ns() - 3600 * 10**9, audience=hub),
         "stale"),
        (fleet.approver_key, sign_command(fleet.approver_key, "device.enroll", body,
                                          audience=hub),
         "needs operator or admin"),
    ]
    forged = SignedEnvelope.decode(sign_command(fleet.admin_key, "device.enroll", body,
                                                audience=hub))
    cases.append((fleet.admin_key,
                  replace(forged, signed=forged.signed.replace(b"dev-1", b"dev-2")).encode(),
                  "does not verify"))
    before = ledger_state(fleet)
    for signer, data, words in cases:
        # The hub answers a command only under the inbox prefix of the key it names: a
        # side connection (as `hub`) that waits there plays that key's holder.
        async with await fleet.client(signer, role="hub") as holder:
            msg = await holder.nc.request("hub.api.device.enroll", data, timeout=WAIT)
        reply = canonical_decode(msg.data)
        assert reply["ok"] is False and words in reply["error"], (words, reply)
    assert ledger_state(fleet) == before
    assert await client.devices() == []


async def test_a_replayed_command_is_refused(fleet: Fleet, client: HubClient) -> None:
    data = sign_command(fleet.admin_key, "device.enroll", {"device": "dev-1"},
                        audience=fleet.config.origin)
    first = canonical_decode((await client.nc.request("hub.api.device.enroll", data,
                                                      timeout=WAIT)).data)
    assert first["ok"] is True, first
    before = ledger_state(fleet)
    again = canonical_decode((await client.nc.request("hub.api.device.enroll", data,
                                                      timeout=WAIT)).data)
    assert again["ok"] is False and "replayed" in again["error"], again
    assert ledger_state(fleet) == before


# ---------------------------------------------------------------- device reports


@pytest.mark.parametrize("kind", ["status", "telemetry"])
async def test_garbage_reports_are_refused_and_the_ledger_is_untouched(
    fleet: Fleet, client: HubClient, kind: str
) -> None:
    await client.call("device.enroll", {"device": "dev-x"})
    before = ledger_state(fleet)
    js = client.nc.jetstream()
    await js.publish(f"fleet.report.dev-x.{kind}", b"\xc1garbage")
    await js.publish(f"fleet.report.dev-x.{kind}", canonical_encode(["not", "a", "map"]))
    await js.publish(f"fleet.report.dev-x.{kind}", status_report("dev-x", seq="one"))
    assert await wait_refused(client, 3) == 3
    assert ledger_state(fleet) == before
    assert fleet.hub.store.verify().ok
    status = await client.call("status")
    assert status["entries"] == before[0] and status["head"] == before[1].hex()


async def test_report_naming_another_device_than_its_subject_is_refused(
    fleet: Fleet, client: HubClient
) -> None:
    for device in ("dev-a", "dev-b"):
        await client.call("device.enroll", {"device": device})
    before = ledger_state(fleet)
    js = client.nc.jetstream()
    signed = status_report("dev-a", device_key(fleet, "dev-a"))
    await js.publish("fleet.report.dev-b.status", signed)
    await js.publish("fleet.report.dev-b.telemetry", telemetry_report("dev-a"))
    await wait_refused(client, 2)
    assert ledger_state(fleet) == before
    rows = {r["device"]: r for r in await client.devices()}
    assert rows["dev-a"]["state"] == rows["dev-b"]["state"] == "enrolled"
    assert not rows["dev-a"]["inferences"] and not rows["dev-b"]["inferences"]

    # The very same report on its own device's subject is taken.
    await js.publish("fleet.report.dev-a.status", signed)
    await fleet.feed.wait_for(lambda _: bool(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED)),
                              timeout=WAIT, what="dev-a's own report to reach the ledger")
    applied = fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED)
    assert [(e.actor, e.payload["device"]) for e in applied] == [("dev-a", "dev-a")]
    assert (await client.call("status"))["refused_reports"] == 2


async def test_report_from_an_unenrolled_device_is_refused(
    fleet: Fleet, client: HubClient
) -> None:
    before = ledger_state(fleet)
    await client.nc.jetstream().publish("fleet.report.dev-z.status", status_report("dev-z"))
    await wait_refused(client, 1)
    assert ledger_state(fleet) == before
    assert await client.devices() == []


# ---------------------------------------------------------------- a hub in its own process


def admin_key(config: HubConfig) -> SigningKey:
    return SigningKey.load(config.operator_key_path("admin"))


async def _hub_answers(url: str, key: SigningKey, auth: NatsAuth) -> bool:
    with contextlib.suppress(HubError):
        async with await HubClient.connect(url, key, timeout=2, auth=auth) as c:
            await c.call("status")
            return True
    return False


@pytest.fixture
async def hub_process(tmp_path: Path, nats_server: EmbeddedNats
                      ) -> AsyncIterator[tuple[HubConfig, subprocess.Popen[bytes]]]:
    """`hub serve` as a child process, stopped by its PID."""
    config = load_config(tmp_path / "hub")  # the nats_server fixture's home (auth on)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with open(tmp_path / "hub.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "serve", "--home", str(config.home)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        key = admin_key(config)
        await poll(lambda: _hub_answers(nats_server.url, key, config.operator_auth(key)), WAIT,
                   "`hub serve` to answer")
        yield config, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


async def test_a_truncated_model_is_refused_and_the_hub_process_survives(
    hub_process: tuple[HubConfig, subprocess.Popen[bytes]], nats_server: EmbeddedNats,
    model_files: dict[str, Path], tmp_path: Path,
) -> None:
    # Half a real model segfaults the TFLite runtime when loaded in-process, so the hub
    # runs here as a child process: a regression kills it, not the test run.
    config, proc = hub_process
    data = model_files["1"].read_bytes()
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(data[: len(data) // 2])
    async with await HubClient.connect(nats_server.url, admin_key(config), WAIT,
                                       auth=config.operator_auth(admin_key(config))) as c:
        task = asyncio.create_task(c.register_model(truncated, "kws", "1"))

        async def settled() -> bool:
            return task.done() or proc.poll() is not None

        await poll(settled, WAIT, "the hub to answer or exit")
        if not task.done():
            task.cancel()
        assert proc.poll() is None, f"the hub exited with status {proc.returncode}"
        with pytest.raises(HubError, match="not a loadable TFLite model"):
            await task
        assert (await c.register_model(model_files["1"], "kws", "1"))["state"] == "registered"


async def test_a_report_with_an_out_of_range_number_does_not_stop_report_intake(
    hub_process: tuple[HubConfig, subprocess.Popen[bytes]], nats_server: EmbeddedNats,
) -> None:
    config, _ = hub_process
    async with await HubClient.connect(nats_server.url, admin_key(config), WAIT,
                                       auth=config.nats_auth("hub")) as c:  # raw reports too
        await c.call("device.enroll", {"device": "dev-1"})
        entries = (await c.call("status"))["entries"]
        js = c.nc.jetstream()
        await js.publish("fleet.report.dev-1.telemetry",
                         telemetry_report("dev-1", count=2**63, errors=0))
        await js.publish("fleet.report.dev-1.status", b"\xc1garbage")
        await wait_refused(c, 1, timeout=3)
    with LedgerStore.open(config.database_url()) as store:
        assert store.count() == entries and store.verify().ok


async def test_hub_process_refuses_garbage_reports_and_keeps_serving(
    hub_process: tuple[HubConfig, subprocess.Popen[bytes]], nats_server: EmbeddedNats,
) -> None:
    """Control for the test above: the child-process hub counts refusals."""
    config, proc = hub_process
    with LedgerStore.open(config.database_url()) as store:
        entries = store.count()
    nc = await nats_connect(nats_server.url, config.nats_auth("hub"))
    try:
        await nc.jetstream().publish("fleet.report.dev-1.status", b"\xc1garbage")
    finally:
        await nc.close()
    async with await HubClient.connect(nats_server.url, admin_key(config), WAIT,
                                       auth=config.operator_auth(admin_key(config))) as c:
        assert await wait_refused(c, 1) == 1
    assert proc.poll() is None
    with LedgerStore.open(config.database_url()) as store:
        assert store.count() == entries and store.verify().ok
