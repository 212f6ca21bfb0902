"""Release as one step with its manifest, validation results of bounded size, the policy
recorded with them, and signatures kept between versions (issue 14, items 4-6).

Real nats-server, real hub, real TFLite models from testkit.modelgen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError

from edge_agent import protocol as proto
from edge_agent.protocol.names import MANIFESTS_BUCKET
from hub import events as ev
from hub.client import HubClient
from hub.governance import state as governance
from testkit.modelgen import model_for_version, write_validation_set
from tests.fleet import Fleet, ledger_state, refused

pytestmark = pytest.mark.timeout(180)

LENIENT_POLICY = '[default]\ntask = "classification"\napprovals_required = 1\n'


def write_model(root: Path, name: str, version: int, n_in: int = 8, n_out: int = 4) -> Path:
    path = root / "models" / f"{name}-v{version}-{n_in}x{n_out}.tflite"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model_for_version(version, n_in=n_in, n_out=n_out))
    return path


async def approved(fleet: Fleet, admin: HubClient, model: Path, name: str,
                   version: str) -> dict[str, str]:
    """Register, validate (it passes) and approve; the ref, ready to release."""
    await admin.register_model(model, name, version)
    data = write_validation_set(model, fleet.root / f"{name}-{version}.npz")
    result = await admin.validate_model(name, version, data)
    assert result["passed"], result["failures"]
    async with await fleet.client(fleet.approver_key) as appr:
        await appr.call("model.approve", {"name": name, "version": version})
    return {"name": name, "version": version}


async def kv_manifest(fleet: Fleet, name: str, version: str) -> bytes | None:
    nc = await fleet.connect()
    try:
        kv = await nc.jetstream().key_value(MANIFESTS_BUCKET)
        try:
            entry = await kv.get(proto.manifest_key(name, version))
        except KeyNotFoundError:
            return None
        return entry.value
    finally:
        await nc.close()


def release_state(fleet: Fleet, name: str, version: str) -> str:
    with fleet.hub.store.engine.connect() as conn:
        row = governance.get_release(conn, name, version)
    assert row is not None
    return str(row["state"])


def released_events(fleet: Fleet) -> list[Any]:
    return [e for e in fleet.hub.store.iter_entries() if e.kind == ev.MODEL_RELEASED]


# ------------------------------------------------------------ release atomic with manifest


async def test_an_oversized_manifest_is_refused_at_release_naming_the_part(
    fleet: Fleet
) -> None:
    fleet.config.policy_path.write_text(LENIENT_POLICY)
    wide = write_model(fleet.root, "wide", 1, n_out=4000)
    async with await fleet.client() as admin:
        ref = await approved(fleet, admin, wide, "wide", "1")
        await refused(fleet, admin, "model.release", ref, "drift bins for 4,000 outputs",
                      "make the manifest", "the limit is 256 KiB", "Nothing was released")
        assert release_state(fleet, "wide", "1") == "approved"
    assert await kv_manifest(fleet, "wide", "1") is None
    assert released_events(fleet) == []


async def test_a_failed_manifest_put_records_no_release_and_a_retry_does(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write_model(fleet.root, "kws", 1)
    async with await fleet.client() as admin:
        ref = await approved(fleet, admin, model, "kws", "1")

        async def nats_down(key: str, envelope: bytes) -> None:
            raise ConnectionError("nats: timeout")

        with monkeypatch.context() as patch:
            patch.setattr(fleet.hub.edge, "put_manifest", nats_down)
            await refused(fleet, admin, "model.release", ref,
                          "cannot publish the manifest of kws/1", "nothing was released")
        assert released_events(fleet) == []
        assert release_state(fleet, "kws", "1") == "approved"
        # Once KV works, the same release goes through, manifest first.
        before = ledger_state(fleet)
        result = await admin.call("model.release", ref)
        assert ledger_state(fleet) != before
    stored = await kv_manifest(fleet, "kws", "1")
    assert stored is not None
    [event] = released_events(fleet)
    assert event.payload["manifest"] == stored
    assert event.payload["manifest_hash"] == result["manifest_hash"]
