"""Validation as a job: `model.validate` answers at once with a job id, `model.validation`
tells its state and progress, a cancelled job records nothing, only a finished one appends
`model.validated`, and a hub restart turns a job left running into "failed: hub
restarted". Driven through the hub's Router with offline effects (no NATS), a data upload
held back by the test so a job is caught while it runs, with no timing involved."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from hub import events as ev
from hub.commands.envelope import sign_command
from hub.commands.jobs import ENDED, RESTARTED, Job, JobCancelled, Jobs
from hub.errors import Refused
from hub.home.config import HubConfig, init_home
from hub.rebuild import live_digest, rebuild_digest
from hub.service.app import HubService
from ledger.signing import SigningKey
from testkit.modelgen import model_for_version, write_validation_set
from tests.fleet import Fleet
from tests.test_rebuild_property import OfflineEffects

pytestmark = pytest.mark.timeout(120)


class HeldEffects(OfflineEffects):
    """Uploads wait for `release` (set by the test) before they are taken."""

    def __init__(self, blobs: dict[str, Path]) -> None:
        super().__init__(blobs)
        self.taking = asyncio.Event()
        self.release = asyncio.Event()

    async def take_upload(self, keyid: str, upload_id: str, digest: str, size: int,
                          max_bytes: int, dest: Path, what: str) -> None:
        if what == "validation data":
            self.taking.set()
            await self.release.wait()
        await super().take_upload(keyid, upload_id, digest, size, max_bytes, dest, what)


class Hub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config: HubConfig = init_home(root / "hub", "nats://127.0.0.1:1")
        model = root / "m.tflite"
        model.write_bytes(model_for_version(1))
        self.model, self.data = model, write_validation_set(model, root / "d.npz")
        self.blobs = {blake3.blake3(p.read_bytes()).hexdigest(): p for p in (model, self.data)}
        self.effects = HeldEffects(self.blobs)
        self.service = HubService(self.config, effects=self.effects)
        self.admin = SigningKey.load(self.config.operator_key_path("admin"))

    async def call(self, verb: str, body: dict[str, Any], key: SigningKey | None = None) -> Any:
        return await self.service.router.handle(
            verb, sign_command(key or self.admin, verb, body, audience=self.config.origin))

    async def register(self) -> None:
        data = self.model.read_bytes()
        await self.call("model.register", {"name": "kws", "version": "1", "upload": "0" * 32,
                                           "digest": blake3.blake3(data).hexdigest(),
                                           "size": len(data)})

    async def validate(self) -> dict[str, Any]:
        data = self.data.read_bytes()
        answer: dict[str, Any] = await self.call("model.validate", {
            "name": "kws", "version": "1", "data_upload": "0" * 32,
            "data_digest": blake3.blake3(data).hexdigest(), "data_size": len(data)})
        return answer

    async def ended(self, job: str) -> dict[str, Any]:
        while True:  # the job's task runs on this loop: yield to it until it ends
            status: dict[str, Any] = await self.call("model.validation", {"job": job})
            if status["state"] in ENDED:
                return status
            await asyncio.sleep(0.01)

    def validated(self) -> list[Any]:
        return [e for e in self.service.store.iter_entries() if e.kind == ev.MODEL_VALIDATED]


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    with tempfile.TemporaryDirectory() as tmp:
        h = Hub(Path(tmp))
        await h.service.bootstrap_admin()
        await h.register()
        yield h
        await h.service.jobs.stop()
        h.service.store.close()


async def test_validate_answers_with_a_job_and_only_the_finished_job_records(hub: Hub) -> None:
    started = await hub.validate()
    assert started["state"] == "queued" and started["job"].startswith("job-")
    assert started["subject"] == "kws/1"
    await hub.effects.taking.wait()
    running = await hub.call("model.validation", {"job": started["job"]})
    assert running["state"] == "running" and running["progress"] == 0.0
    assert running["elapsed_s"] >= 0 and "result" not in running
    assert hub.validated() == []  # nothing before the job ends
    hub.effects.release.set()
    done = await hub.ended(started["job"])
    assert done["state"] == "done" and done["progress"] == 1.0, done
    assert done["result"]["name"] == "kws" and "passed" in done["result"]
    [entry] = hub.validated()
    assert done["result"]["seq"] == [entry.seq]
    rebuilt, _ = rebuild_digest(hub.service.store)
    assert rebuilt == live_digest(hub.service.store)
    with pytest.raises(Refused, match="has ended \\(done\\); nothing to cancel"):
        await hub.call("model.validation.cancel", {"job": started["job"]})
    with pytest.raises(Refused, match="no job 'job-nope'"):
        await hub.call("model.validation", {"job": "job-nope"})


async def test_a_cancelled_job_records_nothing_and_says_so(hub: Hub) -> None:
    started = await hub.validate()
    await hub.effects.taking.wait()
    cancel = await hub.call("model.validation.cancel", {"job": started["job"]})
    assert cancel["cancel_requested"] is True and cancel["state"] == "running"
    hub.effects.release.set()  # the job goes on to its next step, and stops there
    status = await hub.ended(started["job"])
    assert status["state"] == "cancelled" and "result" not in status
    assert status["error"] == "cancelled by an operator"
    assert hub.validated() == []
    # The model can be validated again: the cancelled job left no trace in its state.
    hub.effects.taking.clear()
    again = await hub.validate()
    assert (await hub.ended(again["job"]))["state"] == "done"
    assert len(hub.validated()) == 1


async def test_a_job_left_running_by_a_stopped_hub_is_failed_hub_restarted(hub: Hub) -> None:
    started = await hub.validate()
    await hub.effects.taking.wait()
    # A second process on the same database, as after a restart: the job's task is gone.
    after = Jobs(hub.service.store.engine)
    status = after.status(started["job"])
    assert status["state"] == "failed" and status["error"] == RESTARTED
    assert status["ended_ns"] is not None


async def test_only_registrants_and_operators_cancel(hub: Hub) -> None:
    auditor = SigningKey.generate()
    await hub.call("operator.add", {"name": "aud", "roles": ["auditor"],
                                    "public": auditor.public.raw})
    started = await hub.validate()
    with pytest.raises(Refused, match=r"model\.validation\.cancel needs registrant or operator"):
        await hub.call("model.validation.cancel", {"job": started["job"]}, auditor)
    # Reading the status is open to every operator.
    assert (await hub.call("model.validation", {"job": started["job"]}, auditor))["job"]
    hub.effects.release.set()
    await hub.ended(started["job"])


def test_a_step_records_progress_and_stops_a_cancelled_job() -> None:
    job = Job("job-1", "model.validate", "kws/1", "k", 0)
    job.step(0.4)
    job.step(0.2)  # never backwards
    assert job.progress == 0.4
    job.cancel.set()
    with pytest.raises(JobCancelled):
        job.step(0.5)
    assert job.progress == 0.4


# ---------------------------------------------------------------- the CLI on a real hub


async def test_the_cli_waits_for_the_job_or_prints_its_id(fleet: Fleet) -> None:
    from tests.test_device_tokens import cli

    model = fleet.root / "m.tflite"
    model.write_bytes(model_for_version(1))
    data = write_validation_set(model, fleet.root / "d.npz")
    home = ["--home", str(fleet.config.home), "--nats", fleet.nats_url]
    async with await fleet.client() as admin:
        await admin.register_model(model, "kws", "1")
        await admin.register_model(model, "kws", "2")
    started = await cli("hub.cli", "model", "validate", "kws/1", "--data", str(data),
                        "--no-wait", "--json", *home)
    assert started.returncode == 0, started.stderr
    job = json.loads(started.stdout)["job"]
    while True:
        shown = await cli("hub.cli", "model", "validation", job, "--json", *home)
        status = json.loads(shown.stdout)
        if status["state"] in ENDED:
            break
    assert status["state"] == "done" and status["result"]["name"] == "kws", status
    assert shown.returncode == 0
    waited = await cli("hub.cli", "model", "validate", "kws/2", "--data", str(data),
                       "--json", *home)
    result = json.loads(waited.stdout)
    assert result["version"] == "2" and waited.returncode == (0 if result["passed"] else 1)
    unknown = await cli("hub.cli", "model", "validation", "job-nope", *home)
    assert unknown.returncode == 1 and "no job 'job-nope'" in unknown.stderr + unknown.stdout
    assert len([e for e in fleet.hub.store.iter_entries()
                if e.kind == ev.MODEL_VALIDATED]) == 2


async def test_ended_jobs_leave_memory_and_are_still_answered_from_their_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy import create_engine

    from hub.commands import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "MAX_ENDED_IN_MEMORY", 1)
    jobs = Jobs(create_engine(f"sqlite:///{tmp_path / 'j.db'}"))

    async def quick(job: Job) -> Any:
        job.step(0.5)
        return {"answer": job.job}

    first = jobs.start("model.validate", "kws/1", "k", quick)
    others = [jobs.start("model.validate", "kws/1", "k", quick) for _ in range(2)]
    for job in (first, *others):
        while jobs.status(job.job)["state"] not in ENDED:
            await asyncio.sleep(0.01)  # yield to the jobs' tasks
    jobs.start("model.validate", "kws/1", "k", quick)
    assert first.job not in jobs.held() and others[-1].job in jobs.held()
    status = jobs.status(first.job)  # from its row
    assert status["state"] == "done" and status["result"] == {"answer": first.job}
    await jobs.stop()
