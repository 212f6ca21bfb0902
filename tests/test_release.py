"""Release as one step with its manifest, validation results of bounded size, the policy
recorded with them, and signatures kept between versions (issue 14, items 4-6).

Real nats-server, real hub, real TFLite models from testkit.modelgen.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import blake3
import pytest
from nats.js.errors import KeyNotFoundError

from edge_agent import protocol as proto
from edge_agent.protocol.names import MANIFESTS_BUCKET, MODELS_BUCKET
from hub import events as ev
from hub.client import HubClient
from hub.governance import state as governance
from hub.governance.results import MAX_VALIDATED_BYTES, read_detail
from ledger.encoding import canonical_decode, canonical_encode
from testkit.modelgen import model_for_version, write_validation_set
from tests.fleet import REPO_ROOT, Fleet, ledger_state, refused

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


async def test_too_many_output_values_are_refused_at_validation_not_at_release(
    fleet: Fleet
) -> None:
    """A model whose drift reference devices could not carry (4,000 output values; at
    most MAX_OUTPUTS per telemetry window) is refused when validated, naming the policy
    key that picks the values to watch; nothing is recorded."""
    fleet.config.policy_path.write_text(LENIENT_POLICY)
    wide = write_model(fleet.root, "wide", 1, n_out=4000)
    async with await fleet.client() as admin:
        await admin.register_model(wide, "wide", "1")
        data = write_validation_set(wide, fleet.root / "wide.npz")
        staged = await admin.upload(data)
        await refused(fleet, admin, "model.validate",
                      {"name": "wide", "version": "1", "data_upload": staged.upload_id,
                       "data_digest": staged.digest, "data_size": staged.size},
                      "has 4,000 values", f"at most {proto.MAX_OUTPUTS}", "drift_values")
        assert release_state(fleet, "wide", "1") == "registered"
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


# ------------------------------------------------------------ bounded validation results


def validated_events(fleet: Fleet, name: str) -> list[Any]:
    return [e for e in fleet.hub.store.iter_entries()
            if e.kind == ev.MODEL_VALIDATED and e.payload["name"] == name]


async def test_a_wide_model_watches_the_values_its_policy_names(fleet: Fleet) -> None:
    """1,500 output values: with drift_values = 64 the gate keeps 64 references (what a
    device histograms), model.validated stays small, listing stays readable, and the
    manifest carries exactly those drift bins."""
    fleet.config.policy_path.write_text(LENIENT_POLICY + "\n[models.wide]\ndrift_values = 64\n")
    wide = write_model(fleet.root, "wide", 1, n_in=100, n_out=1500)
    small = write_model(fleet.root, "kws", 1)
    async with await fleet.client() as admin:
        ref = await approved(fleet, admin, wide, "wide", "1")
        await approved(fleet, admin, small, "kws", "1")
        [event] = validated_events(fleet, "wide")
        payload = {k: v for k, v in event.payload.items() if k != "command"}
        assert len(canonical_encode(payload)) <= MAX_VALIDATED_BYTES
        assert payload["metrics"]["drift_values"] == {"watched": 64, "of": 1500}
        listed = await admin.call("models")
        assert {(r["name"], r["validation"]["passed"]) for r in listed} == {
            ("wide", True), ("kws", True)}
        await admin.call("model.release", ref)
    manifest_bytes = await kv_manifest(fleet, "wide", "1")
    assert manifest_bytes is not None
    manifest = proto.ReleaseManifest.from_map(
        canonical_decode(proto.SignedEnvelope.decode(manifest_bytes).signed))
    assert len(manifest.drift_bins) == 64


async def test_the_policy_used_is_recorded_and_shown(fleet: Fleet) -> None:
    model = write_model(fleet.root, "kws", 1)
    strict = ('[default]\ntask = "classification"\nmax_p95_latency_ms = 0.0\n'
              '[models.kws]\nmin_accuracy = 0.5\n')
    fleet.config.policy_path.write_text(strict)
    async with await fleet.client() as admin:
        await admin.register_model(model, "kws", "1")
        data = write_validation_set(model, fleet.root / "kws.npz")
        first = await admin.validate_model("kws", "1", data)
        assert not first["passed"]
        assert first["policy"]["max_p95_latency_ms"] == 0.0
        fleet.config.policy_path.write_text(LENIENT_POLICY)
        second = await admin.validate_model("kws", "1", data)
        assert second["passed"]
        old, new = (e.payload for e in validated_events(fleet, "kws"))
        assert old["policy"] == {"model_name": "kws", "task": "classification",
                                 "min_accuracy": 0.5, "max_p95_latency_ms": 0.0,
                                 "noise_std": 0.05, "histogram_bins": 10,
                                 "approvals_required": 1, "importance_rows": 256,
                                 "importance_budget_s": 20.0}
        assert "max_p95_latency_ms" not in new["policy"]
        for p in (old, new):
            assert p["policy_digest"] == blake3.blake3(
                canonical_encode(p["policy"])).hexdigest()
            assert p["policy_file"] == "policy.toml"
        assert old["policy_digest"] != new["policy_digest"]
        recorded = await admin.call("policy.show", {"name": "kws", "version": "1"})
        assert (recorded["policy"], recorded["policy_digest"]) == (
            new["policy"], new["policy_digest"])
        fleet.config.policy_path.write_text(strict)
        now = await admin.call("policy.show", {"name": "kws"})
        assert now["policy"]["min_accuracy"] == 0.5 and "[models.kws]" in now["source"]
        default = await admin.call("policy.show", {})
        assert "min_accuracy" not in default["policy"]
    # `hub policy show NAME/VERSION --json`, as an operator runs it.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", "policy", "show", "kws/1", "--json",
        "--home", str(fleet.config.home), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    assert json.loads(stdout)["policy_digest"] == new["policy_digest"]


# ------------------------------------------------------------ signatures between versions


async def test_a_new_input_shape_is_refused_at_release_unless_allowed_and_recorded(
    fleet: Fleet
) -> None:
    v1 = write_model(fleet.root, "kws", 1, n_in=8)
    v2 = write_model(fleet.root, "kws", 2, n_in=16)
    async with await fleet.client() as admin:
        await admin.call("model.release", await approved(fleet, admin, v1, "kws", "1"))
        registered = await admin.register_model(v2, "kws", "2")
        assert "--allow-signature-change" in registered["warnings"][0]
        data = write_validation_set(v2, fleet.root / "kws-2.npz")
        assert (await admin.validate_model("kws", "2", data))["passed"]
        async with await fleet.client(fleet.approver_key) as appr:
            await appr.call("model.approve", {"name": "kws", "version": "2"})
        ref = {"name": "kws", "version": "2"}
        await refused(fleet, admin, "model.release", ref,
                      "its signature differs from released kws/1",
                      "input 0 (input) shape [1, 8] -> [1, 16]", "--allow-signature-change")
        assert await kv_manifest(fleet, "kws", "2") is None
        result = await admin.call("model.release", {**ref, "allow_signature_change": True})
        assert result["state"] == "released"
    [first, second] = released_events(fleet)
    assert "signature_change" not in first.payload
    change = second.payload["signature_change"]
    assert change["from_version"] == "1"
    assert change["old"]["inputs"][0]["shape"] == [1, 8]
    assert change["new"]["inputs"][0]["shape"] == [1, 16]
    assert change["new"]["inputs"][0]["quantization"] == {"scale": 0.0, "zero_point": 0}
    # `hub model show` prints each tensor with its quantization.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="200")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", "model", "show", "kws/2",
        "--home", str(fleet.config.home), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    assert "input input [1, 16] float32 not quantized" in stdout.decode()


# ------------------------------------------------------------ detail by digest, manifest size
# The gate now refuses (or, with drift_values, trims) a reference over MAX_OUTPUTS values,
# so no real model reaches these paths any more; a validation with N reference histograms
# is crafted from a real one (the same histogram, N outputs), as an older hub's ledger or
# a future gate could hold.


def many_histograms(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make the hub's gate report `count` reference histograms (copies of its first)."""
    import dataclasses

    from hub import validation

    real = validation.validate

    def crafted(*args: Any, **kwargs: Any) -> Any:
        report = real(*args, **kwargs)
        first = report.reference_histograms[0]
        return dataclasses.replace(report, reference_histograms=[
            dataclasses.replace(first, output_index=k) for k in range(count)])

    monkeypatch.setattr(validation, "validate", crafted)


async def stored_blob(fleet: Fleet, digest: str) -> bytes:
    nc = await fleet.connect()
    try:
        store = await nc.jetstream().object_store(MODELS_BUCKET)
        data = (await store.get(digest)).data
        assert data is not None
        return bytes(data)
    finally:
        await nc.close()


async def test_reference_histograms_go_to_the_detail_and_release_reads_them_by_digest(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 reference histograms are over the entry's inline budget: model.validated keeps
    a summary and names the detail document by digest; the blob under that digest hashes
    to it and holds them all; release fetches it, checks it, and the manifest carries
    every histogram's edges."""
    fleet.config.policy_path.write_text(LENIENT_POLICY)
    many_histograms(monkeypatch, 600)
    model = write_model(fleet.root, "kws", 1)
    async with await fleet.client() as admin:
        ref = await approved(fleet, admin, model, "kws", "1")
        [event] = validated_events(fleet, "kws")
        payload = {k: v for k, v in event.payload.items() if k != "command"}
        assert len(canonical_encode(payload)) <= MAX_VALIDATED_BYTES
        assert payload["reference_histograms"] == []
        assert payload["reference_histograms_summary"]["outputs"] == 600
        detail = payload["detail"]
        assert "reference_histograms" in detail["parts"]
        blob = await stored_blob(fleet, detail["digest"])
        assert len(blob) == detail["size"]
        assert blake3.blake3(blob).hexdigest() == detail["digest"]
        histograms = read_detail(blob)["reference_histograms"]
        assert [h["output_index"] for h in histograms] == list(range(600))
        await admin.call("model.release", ref)
    stored = await kv_manifest(fleet, "kws", "1")
    assert stored is not None
    manifest = proto.ReleaseManifest.from_map(
        canonical_decode(proto.SignedEnvelope.decode(stored).signed))
    assert manifest.drift_bins == [h["edges"] for h in histograms]


async def test_a_detail_that_does_not_match_its_digest_releases_nothing(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The detail's blob replaced under its digest (storage corrupted or tampered with):
    release refuses, saying so, and records nothing."""
    fleet.config.policy_path.write_text(LENIENT_POLICY)
    many_histograms(monkeypatch, 600)
    model = write_model(fleet.root, "kws", 1)
    async with await fleet.client() as admin:
        ref = await approved(fleet, admin, model, "kws", "1")
        [event] = validated_events(fleet, "kws")
        digest = event.payload["detail"]["digest"]
        nc = await fleet.connect()
        try:
            store = await nc.jetstream().object_store(MODELS_BUCKET)
            await store.put(digest, b"\0" * event.payload["detail"]["size"])
        finally:
            await nc.close()
        await refused(fleet, admin, "model.release", ref,
                      "validation detail does not match digest", digest[:16])
        assert release_state(fleet, "kws", "1") == "approved"
    assert released_events(fleet) == []
    assert await kv_manifest(fleet, "kws", "1") is None


async def test_an_oversized_manifest_is_refused_at_release_naming_its_biggest_part(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """14,336 reference histograms (BlazeFace's first output, before the gate bounded
    it) make a manifest over the 256 KiB devices accept: release refuses before any put,
    naming the drift bins, and the ledger, KV and state say nothing was released."""
    fleet.config.policy_path.write_text(LENIENT_POLICY)
    many_histograms(monkeypatch, 14_336)
    model = write_model(fleet.root, "kws", 1)
    async with await fleet.client() as admin:
        ref = await approved(fleet, admin, model, "kws", "1")
        [event] = validated_events(fleet, "kws")
        assert event.payload["reference_histograms_summary"]["outputs"] == 14_336
        await refused(fleet, admin, "model.release", ref,
                      "cannot release kws/1", "drift bins for 14,336 outputs",
                      f"the limit is {proto.MAX_ENVELOPE_BYTES // 1024} KiB",
                      "Nothing was released")
        assert release_state(fleet, "kws", "1") == "approved"
    assert released_events(fleet) == []
    assert await kv_manifest(fleet, "kws", "1") is None
