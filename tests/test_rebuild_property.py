"""Property: whatever sequence of commands (accepted or refused) and device reports the
hub sees, the live state equals the state rebuilt from the ledger alone.

The hub runs offline here (no NATS): its effects read blobs from local files and drop KV
writes, so the test exercises exactly the command checks, the events and the fold,
through the hub's router and its report intake (the path fetched report batches take).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import blake3
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge_agent import protocol as proto
from hub.commands.envelope import sign_command as sign_for_hub
from hub.commands.jobs import ENDED
from hub.errors import Refused
from hub.home.config import init_home
from hub.rebuild import live_digest, rebuild_digest
from hub.service.app import HubService
from ledger.signing import SigningKey
from testkit.modelgen import model_for_version, write_validation_set

DEVICES = ("d1", "d2", "d3")
VERSIONS = ("1", "2")


class OfflineEffects:
    """The hub's side effects with blobs from a dict and no NATS."""

    def __init__(self, blobs: dict[str, Path]) -> None:
        self.blobs = blobs

    async def read_blob(self, digest: str, size: int, dest: Path) -> str:
        data = self.blobs[digest].read_bytes()
        dest.write_bytes(data)
        return blake3.blake3(data).hexdigest()

    async def put_blob(self, digest: str, data: bytes) -> None:
        return None

    async def take_upload(self, keyid: str, upload_id: str, digest: str, size: int,
                          max_bytes: int, dest: Path, what: str) -> None:
        dest.write_bytes(self.blobs[digest].read_bytes())  # uploads named by their digest

    def discard_upload(self, keyid: str, upload_id: str) -> None:
        return None

    async def store_blob(self, digest: str, path: Path) -> None:
        return None

    async def release_blob(self, digest: str, size: int) -> None:
        return None

    async def put_manifest(self, key: str, envelope: bytes) -> None:
        return None

    async def put_assignment(self, device: str, envelope: bytes) -> None:
        return None

    async def publish_root(self, data: bytes) -> None:
        return None

    async def sync_nats_users(self, wait: bool = True) -> bool:
        return False


command = st.one_of(
    st.tuples(st.just("enroll"), st.sampled_from(DEVICES)),
    st.tuples(st.just("register"), st.sampled_from(VERSIONS)),
    st.tuples(st.just("validate"), st.sampled_from(VERSIONS)),
    st.tuples(st.just("approve"), st.sampled_from(VERSIONS)),
    st.tuples(st.just("self_approve"), st.sampled_from(VERSIONS)),
    st.tuples(st.just("release"), st.sampled_from(VERSIONS)),
    st.tuples(st.just("deploy"), st.sampled_from(VERSIONS)),
    st.tuples(st.just("revoke"), st.sampled_from(VERSIONS)),
    st.tuples(st.just("report"), st.sampled_from(DEVICES)),
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    out: dict[str, Path] = {}
    for version in VERSIONS:
        model = root / f"m{version}.tflite"
        model.write_bytes(model_for_version(int(version)))
        out[version] = model
        out[f"data{version}"] = write_validation_set(model, root / f"d{version}.npz")
    return out


@pytest.mark.timeout(300)
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(command, min_size=1, max_size=14))
@example([("register", "1"), ("validate", "1"), ("self_approve", "1"), ("approve", "1"),
          ("release", "1"), ("enroll", "d1"), ("deploy", "1"), ("report", "d1"),
          ("revoke", "1"), ("deploy", "1")])
def test_live_state_always_equals_the_state_rebuilt_from_the_ledger(
    assets: dict[str, Path], ops: list[tuple[str, str]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_run(Path(tmp), assets, ops))


async def _run(tmp: Path, assets: dict[str, Path], ops: list[tuple[str, str]]) -> None:
    config = init_home(tmp / "hub", "nats://127.0.0.1:1")
    blobs = {blake3.blake3(p.read_bytes()).hexdigest(): p for p in assets.values()}
    hub = HubService(config, effects=OfflineEffects(blobs))
    await hub.bootstrap_admin()
    handle = hub.router.handle

    def sign_command(key: SigningKey, verb: str, body: dict[str, Any]) -> bytes:
        return sign_for_hub(key, verb, body, audience=config.origin)

    admin = SigningKey.load(config.operator_key_path("admin"))
    approver = SigningKey.generate()
    await handle("operator.add", sign_command(admin, "operator.add", {
        "name": "ann", "roles": ["approver"], "public": approver.public.raw}))
    report_seq = 0
    for op, arg in ops:
        ref = {"name": "kws", "version": arg}
        try:
            if op == "enroll":
                await handle("device.enroll", sign_command(admin, "device.enroll", {"device": arg}))
            elif op == "register":
                data = assets[arg].read_bytes()
                await handle("model.register", sign_command(admin, "model.register", {
                    **ref, "upload": "0" * 32, "digest": blake3.blake3(data).hexdigest(),
                    "size": len(data)}))
            elif op == "validate":
                data = assets[f"data{arg}"].read_bytes()
                started = await handle("model.validate", sign_command(admin, "model.validate", {
                    **ref, "data_upload": "0" * 32, "data_digest": blake3.blake3(data).hexdigest(),
                    "data_size": len(data)}))
                while hub.jobs.status(started["job"])["state"] not in ENDED:  # a job
                    await asyncio.sleep(0.02)
            elif op in ("approve", "self_approve"):
                signer = approver if op == "approve" else admin
                await handle("model.approve", sign_command(signer, "model.approve", ref))
            elif op == "release":
                await handle("model.release", sign_command(admin, "model.release", ref))
            elif op == "revoke":
                await handle("model.revoke", sign_command(
                    admin, "model.revoke", {**ref, "reason": "test"}))
            elif op == "deploy":
                await handle("deploy", sign_command(admin, "deploy", {
                    "model": "kws", "version": arg, "all": True}))
            elif op == "report":
                report_seq += 1
                status = proto.StatusReport(
                    device=arg, boot="b", seq=report_seq, ts=report_seq, event="applied",
                    model="kws", version="1", digest="00", counter=1, reason="",
                    probe_output=[0.5],
                )
                bundle_key = hub.config.home / "devices" / arg / "device.key"
                signer = SigningKey.load(bundle_key) if bundle_key.exists() else admin
                assert await hub.reports.take([(f"fleet.report.{arg}.status",
                                                proto.encode_signed_report(status, signer))])
        except (Refused, proto.ProtocolError):
            pass  # refused commands must leave no trace; the digests below check it
    rebuilt, count = rebuild_digest(hub.store)
    assert count == hub.store.count()
    assert rebuilt == live_digest(hub.store)
    assert hub.store.verify().ok
    hub.store.close()
