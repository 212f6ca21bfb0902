"""Every decoder refuses garbage with its own clear error and never crashes; the hub
keeps serving through a flood of garbage on every subject it listens to."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import protocol as proto
from edge_agent.trust.root import TrustError, TrustRoot
from hub.commands.envelope import CommandRefused, Operator, open_command, sign_command
from ledger.checkpoint import Checkpoint
from ledger.encoding import canonical_encode
from ledger.entry import GENESIS_PREV, Entry, encode_body
from ledger.errors import LedgerError
from ledger.note import Verifier, open_note
from ledger.signing import SigningKey
from tests.fleet import Fleet

FUZZ = settings(max_examples=300, deadline=None)
KEY = SigningKey.generate()
ROOT = TrustRoot.from_envelope(TrustRoot.build({r: [KEY] for r in
                                                ("root", "release", "director", "log")}))
OPERATORS = {KEY.keyid: Operator("admin", KEY.keyid, KEY.public.raw, ("admin",))}
VERIFIER = Verifier("fleetledger/test", KEY.public.raw)


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """A truncation, a flipped byte or an insertion of a valid document."""
    choice = rnd.randrange(3)
    if choice == 0 and data:
        return data[: rnd.randrange(len(data))]
    if choice == 1 and data:
        i = rnd.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << rnd.randrange(8))]) + data[i + 1:]
    i = rnd.randrange(len(data) + 1)
    return data[:i] + os.urandom(rnd.randrange(1, 8)) + data[i:]


VALID_ASSIGNMENT = proto.SignedEnvelope.sign(proto.Assignment(
    device="dev-1", model="kws", version="1", digest="ab" * 32, manifest_hash="cd" * 32,
    counter=1, rollout="r", issued_at=1, expires=2**62).to_map(), proto.DOMAIN_ASSIGNMENT,
    [KEY]).encode()
VALID_BODY = encode_body(0, 1, "model.registered", "hub", "model:kws/1", {"a": [1, 2]})


@FUZZ
@given(st.binary(max_size=4096) | st.builds(mutate, st.just(VALID_ASSIGNMENT), st.randoms()))
def test_assignments_and_manifests_refuse_garbage_cleanly(data: bytes) -> None:
    for role, domain, doc_type in (("director", proto.DOMAIN_ASSIGNMENT, proto.Assignment),
                                   ("release", proto.DOMAIN_MANIFEST, proto.ReleaseManifest)):
        try:
            env = proto.SignedEnvelope.decode(data)
            doc_type.from_map(ROOT.verify(env, role, domain))
        except (proto.ProtocolError, TrustError):
            pass


@FUZZ
@given(st.binary(max_size=4096) | st.builds(mutate, st.just(VALID_BODY), st.randoms()))
def test_ledger_entry_bodies_refuse_garbage_cleanly(data: bytes) -> None:
    with contextlib.suppress(LedgerError):
        Entry.from_body(data, GENESIS_PREV, bytes(32))


@FUZZ
@given(st.binary(max_size=4096) | st.builds(
    mutate, st.just(sign_command(KEY, "devices", {}, audience="hub")), st.randoms()))
def test_operator_envelopes_refuse_garbage_cleanly(data: bytes) -> None:
    try:
        open_command(data, "devices", OPERATORS, set(), audience="hub")
    except CommandRefused as exc:
        assert str(exc)


NOTE = b"fleetledger/test\n3\n" + b"A" * 43 + b"=\n\n"


@FUZZ
@given(st.binary(max_size=2048) | st.builds(mutate, st.just(NOTE), st.randoms()))
def test_checkpoint_notes_refuse_garbage_cleanly(data: bytes) -> None:
    with contextlib.suppress(LedgerError):
        open_note(data, [VERIFIER])
    with contextlib.suppress(LedgerError, UnicodeDecodeError):
        Checkpoint.parse(data.decode("utf-8", errors="strict"))


@FUZZ
@given(st.binary(max_size=4096) | st.builds(
    mutate, st.just(canonical_encode({"type": "telemetry"})), st.randoms()))
def test_reports_refuse_garbage_cleanly(data: bytes) -> None:
    try:
        proto.decode_report(data)
    except proto.ProtocolError as exc:
        assert str(exc)


@pytest.mark.timeout(120)
async def test_hub_keeps_serving_through_a_garbage_flood(fleet: Fleet) -> None:
    before = (fleet.hub.store.count(), fleet.hub.store.head())
    nc = await fleet.connect()
    js = nc.jetstream()
    rnd = random.Random(1)
    subjects = ["hub.api.deploy", "hub.api.device.enroll", "hub.api.model.register",
                "hub.api.status", "hub.api.nope", "ledger.api.checkpoint"]
    for i in range(400):
        payload = os.urandom(rnd.randrange(0, 3000))
        if i % 2:
            await nc.publish(rnd.choice(subjects), payload)
        else:
            await js.publish(f"fleet.report.dev-{i % 7}.{rnd.choice(['status', 'telemetry'])}",
                             payload)
    await nc.flush()
    async with await fleet.client() as client:
        # The hub still answers, and has seen (and refused) the report garbage.
        async def refused_all() -> None:
            while (await client.call("status"))["refused_reports"] < 200:
                await asyncio.sleep(0.1)

        await asyncio.wait_for(refused_all(), 60)
        assert (await client.call("whoami"))["name"] == "admin"
    await nc.close()
    assert (fleet.hub.store.count(), fleet.hub.store.head()) == before
    assert fleet.hub.store.verify().ok
