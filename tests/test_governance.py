"""Governance: roles, four eyes, the lifecycle state machine, the validation gate,
signed history, and state that is only ever a fold of the ledger.

Real nats-server, real hub, real SQLite, real TFLite. Every refusal checks its message
and that the ledger did not change.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.transport.connect import connect as nats_connect
from hub import events as ev
from hub.client import HubClient
from hub.errors import HubError
from hub.home.nats_config import operator_inbox_prefix
from hub.rebuild import live_digest, rebuild_digest
from ledger.signing import SigningKey
from testkit.modelgen import write_validation_set
from tests.fleet import REPO_ROOT, Fleet, ledger_state, refused

pytestmark = pytest.mark.timeout(180)


async def add_operator(admin: HubClient, name: str, *roles: str) -> SigningKey:
    key = SigningKey.generate()
    await admin.call("operator.add", {"name": name, "roles": list(roles),
                                      "public": key.public.raw})
    return key


def noisy_validation_set(model: Path, out: Path) -> Path:
    """Labels mostly random: accuracy far below any sane policy minimum."""
    write_validation_set(model, out)
    data = dict(np.load(out))
    rng = np.random.default_rng(3)
    data["labels"] = rng.integers(0, 4, size=len(data["labels"]))
    np.savez(out, **data)
    return out


async def test_illegal_transitions_are_refused_with_what_is_allowed_next(
    fleet: Fleet, model_files: dict[str, Path]
) -> None:
    async with await fleet.client() as admin, await fleet.client(fleet.approver_key) as appr:
        await admin.register_model(model_files["1"], "kws", "1")
        ref = {"name": "kws", "version": "1"}
        await refused(fleet, appr, "model.approve", ref, "cannot approve kws/1",
                      "it is registered", "hub model validate kws/1")
        await refused(fleet, admin, "model.release", ref, "cannot release kws/1",
                      "allowed next")
        await refused(fleet, admin, "deploy", {"model": "kws", "version": "1", "all": True},
                      "cannot deploy kws/1", "it is registered")
        # A failed validation blocks approval until a validation passes.
        bad = noisy_validation_set(model_files["1"], fleet.root / "noisy.npz")
        result = await admin.validate_model("kws", "1", bad)
        assert not result["passed"] and any("accuracy" in f for f in result["failures"])
        await refused(fleet, appr, "model.approve", ref, "it is validation_failed")
        good = write_validation_set(model_files["1"], fleet.root / "good.npz")
        assert (await admin.validate_model("kws", "1", good))["passed"]
        await appr.call("model.approve", ref)
        await admin.call("model.release", ref)
        await refused(fleet, admin, "model.release", ref, "it is released",
                      "hub model deprecate kws/1")
        await admin.call("model.revoke", {**ref, "reason": "found a bug"})
        await refused(fleet, admin, "deploy", {"model": "kws", "version": "1", "all": True},
                      "it is revoked", "nothing more can happen")


async def test_registrant_cannot_approve_own_model_and_nobody_approves_twice(
    fleet: Fleet, model_files: dict[str, Path]
) -> None:
    async with await fleet.client() as admin:
        both = await add_operator(admin, "bob", "registrant", "approver")
        async with await fleet.client(both) as bob, \
                await fleet.client(fleet.approver_key) as appr:
            await bob.register_model(model_files["1"], "kws", "1")
            data = write_validation_set(model_files["1"], fleet.root / "v.npz")
            await bob.validate_model("kws", "1", data)
            ref = {"name": "kws", "version": "1"}
            await refused(fleet, bob, "model.approve", ref, "you registered it", "four eyes")
            await appr.call("model.approve", ref)
            # approvals_required is 1 by default: approved now; a second try is refused.
            await refused(fleet, appr, "model.approve", ref, "it is approved")


async def test_roles_revocation_and_unsigned_commands_are_enforced(
    fleet: Fleet, model_files: dict[str, Path]
) -> None:
    async with await fleet.client() as admin:
        auditor_key = await add_operator(admin, "audrey", "auditor")
        async with await fleet.client(auditor_key) as audrey:
            assert (await audrey.call("whoami"))["roles"] == ["auditor"]
            await audrey.devices()  # reads are open to every operator
            await refused(fleet, audrey, "device.enroll", {"device": "dev-1"},
                          "audrey has role(s) auditor", "device.enroll needs operator or admin")
            await refused(fleet, audrey, "operator.add",
                          {"name": "eve", "roles": ["admin"], "public": bytes(32)},
                          "operator.add needs admin")
            await admin.call("operator.revoke", {"name": "audrey", "reason": "left"})
            with pytest.raises(HubError):  # her NATS user is gone: disconnected
                await audrey.call("whoami")
        # Her key over someone else's NATS connection (answers under her inbox prefix, the
        # only place the hub answers her commands): the hub still refuses it.
        stolen = HubClient(await nats_connect(fleet.nats_url, replace(
            fleet.config.nats_auth("hub"), inbox_prefix=operator_inbox_prefix(
                auditor_key.keyid))), auditor_key, 10)
        try:
            await refused(fleet, stolen, "devices", {}, "audrey", "has been revoked")
        finally:
            await stolen.close()
        await refused(fleet, admin, "operator.revoke", {"name": "admin"},
                      "cannot revoke your own key")
    # A command that is not a signed envelope at all (answered under an operator inbox).
    before = ledger_state(fleet)

    nc = await nats_connect(fleet.nats_url, replace(
        fleet.config.nats_auth("hub"), inbox_prefix=operator_inbox_prefix("nobody")))
    from ledger.encoding import canonical_decode, canonical_encode

    reply = canonical_decode((await nc.request(
        "hub.api.device.enroll", canonical_encode({"device": "dev-9"}), timeout=10)).data)
    await nc.close()
    assert reply["ok"] is False and "unsigned or malformed command" in reply["error"]
    assert ledger_state(fleet) == before


async def test_full_story_register_validate_two_approvals_release_history_rebuild(
    fleet: Fleet, model_files: dict[str, Path]
) -> None:
    fleet.config.policy_path.write_text(
        '[default]\ntask = "classification"\nmin_accuracy = 0.9\napprovals_required = 1\n'
        '[models.kws]\napprovals_required = 2\n'
    )
    async with await fleet.client() as admin:
        carol_key = await add_operator(admin, "carol", "approver")
        async with await fleet.client(fleet.approver_key) as appr, \
                await fleet.client(carol_key) as carol:
            lineage = {"training_data_digest": "ab" * 32, "code_ref": "git:1234abcd",
                       "params": {"epochs": 3}, "metrics": {"train_accuracy": 0.97}}
            card = {"intended_use": "wake word detection", "limitations": ["English only"],
                    "owners": ["audio team"]}
            for version in ("1", "2"):
                await admin.register_model(model_files[version], "kws", version, lineage, card)
            # v1 fails validation, v2 passes.
            bad = noisy_validation_set(model_files["1"], fleet.root / "bad.npz")
            assert not (await admin.validate_model("kws", "1", bad))["passed"]
            good = write_validation_set(model_files["2"], fleet.root / "good.npz")
            passed = await admin.validate_model("kws", "2", good)
            assert passed["passed"]
            assert "permutation_importance" in passed["metrics"]
            ref = {"name": "kws", "version": "2"}
            await refused(fleet, admin, "model.approve", ref, "needs approver")
            first = await appr.call("model.approve", ref)
            assert (first["approvals"], first["required"], first["state"]) == (1, 2, "validated")
            await refused(fleet, admin, "model.release", ref, "it is validated")
            second = await carol.call("model.approve", ref)
            assert second["state"] == "approved"
            await admin.call("model.release", ref)
            shown = await admin.call("model.show", ref)
            assert shown[0]["card"] == card and shown[0]["lineage"] == lineage
            assert shown[0]["state"] == "released"

    # `hub model history` as an auditor would run it: every signature checks.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="200")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", "model", "history", "kws", "--json",
        "--home", str(fleet.config.home), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    history = json.loads(stdout)
    assert [(h["event"], f"{h['model']}/{h['version']}", h["actor"]) for h in history] == [
        (ev.MODEL_REGISTERED, "kws/1", "admin"),
        (ev.MODEL_REGISTERED, "kws/2", "admin"),
        (ev.MODEL_VALIDATED, "kws/1", "admin"),
        (ev.MODEL_VALIDATED, "kws/2", "admin"),
        (ev.MODEL_APPROVED, "kws/2", "approver"),
        (ev.MODEL_APPROVED, "kws/2", "carol"),
        (ev.MODEL_RELEASED, "kws/2", "admin"),
    ]
    assert all(h["signature"] == "valid" for h in history)

    # The hub's state is a fold of the ledger: rebuilt from scratch, same digest.
    rebuilt, count = rebuild_digest(fleet.hub.store)
    assert count == fleet.hub.store.count()
    assert rebuilt == live_digest(fleet.hub.store)


async def test_history_flags_a_forged_signature(fleet: Fleet, model_files: dict[str, Path]
                                                ) -> None:
    """An auditor does not trust the hub: a command whose signature does not verify
    against the operator's key is shown as INVALID and the command exits 1."""
    from typer.testing import CliRunner

    from hub.cli import app  # in-process, so we can feed it a doctored hub answer

    async with await fleet.client() as admin:
        await admin.register_model(model_files["1"], "kws", "1")
        history = await admin.call("model.history", {"name": "kws"})
    event = history["events"][0]
    envelope = bytearray(event["payload"]["command"])
    envelope[-1] ^= 0x01  # inside the signed bytes: the signature no longer matches
    event["payload"]["command"] = bytes(envelope)

    async def doctored(self: HubClient, verb: str, body: dict[str, Any] | None = None) -> Any:
        return history

    original = HubClient.call
    HubClient.call = doctored  # type: ignore[method-assign]
    try:
        result = await asyncio.to_thread(
            CliRunner().invoke, app,
            ["model", "history", "kws", "--json", "--home", str(fleet.config.home)],
        )
    finally:
        HubClient.call = original  # type: ignore[method-assign]
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert rows[0]["signature"] == "INVALID"


async def test_validation_runs_outside_the_write_lock(
    fleet: Fleet, model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the gate runs the model, other commands commit (the hub's single write lock
    is not held); a twin validation of the same version started meanwhile is refused
    when it comes to commit, and the ledger holds exactly one model.validated."""
    import threading

    from hub import validation

    real = validation.validate
    started = threading.Event()
    release = threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:
        started.set()
        assert release.wait(60), "the test never released the validation"
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, "validate", held)
    data = write_validation_set(model_files["1"], fleet.root / "v.npz")
    async with await fleet.client() as admin, await fleet.client() as twin:
        await admin.register_model(model_files["1"], "kws", "1")
        first = asyncio.create_task(admin.validate_model("kws", "1", data))
        second = asyncio.create_task(twin.validate_model("kws", "1", data))
        assert await asyncio.to_thread(started.wait, 30)
        enrolled = await admin.call("device.enroll", {"device": "dev-meanwhile"})
        assert not first.done() and not second.done()  # both still inside the model
        release.set()
        results = await asyncio.gather(first, second, return_exceptions=True)
    passed = [r for r in results if isinstance(r, dict)]
    errors = [str(r) for r in results if isinstance(r, Exception)]
    assert len(passed) == 1 and passed[0]["passed"], results
    assert len(errors) == 1 and "cannot validate kws/1: it is validated" in errors[0], errors
    kinds = [(e.seq, e.kind) for e in fleet.hub.store.iter_entries()
             if e.kind in (ev.DEVICE_ENROLLED, ev.MODEL_VALIDATED)]
    assert [k for _, k in kinds] == [ev.DEVICE_ENROLLED, ev.MODEL_VALIDATED], kinds
    assert kinds[0][0] in enrolled["seq"]
    assert fleet.hub.store.verify().ok
