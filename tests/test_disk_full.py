"""The agent's disk fills up during an update: it says so, cleans up, keeps serving.

- The disk fills in the middle of a download (ENOSPC injected by the agent's fault hook,
  edge_agent.faults `download_enospc`, with the report spool failing too): the failure
  is reported with its reason (from memory, as the spool cannot take it), the partial
  download is removed, the inference loop and the local API keep running the current
  model, and the update is retried with backoff, not in a fast loop.
- A download that cannot fit (`disk_free`) is refused before a byte is written.
- For real, as root: the state directory on a small tmpfs. The pre-check refuses, the
  disk filled by another file during the download gives a real ENOSPC, and once space
  is freed the agent installs by itself. Skipped with the reason where `mount` is not
  allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from edge_agent import protocol as proto
from edge_agent.download import PARTIAL_NAME
from edge_agent.serving.client import InferenceClient
from edge_agent.slots import SlotStore
from hub import events as ev
from testkit.modelgen import model_for_version
from testkit.tcp_proxy import TcpProxy
from tests.device_kit import ReportWatch, configured_agent, deploy, deploy_and_wait
from tests.fleet import Fleet

DEVICE = "dev-0"
BIG = 4_000_000


async def release(fleet: Fleet, model_files: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    big = tmp_path / "kws-v2-big.tflite"
    big.write_bytes(model_for_version(2, extra_bytes=BIG))
    await fleet.release_model(model_files["1"], "kws", "1")
    await fleet.release_model(big, "kws", "2")
    return {"1": blake3.blake3(model_files["1"].read_bytes()).hexdigest(),
            "2": blake3.blake3(big.read_bytes()).hexdigest()}


async def still_serving_v1(reports: ReportWatch, state_dir: Path, digest: str,
                           after: int) -> None:
    """The inference loop still counts kws/1 and the local API still answers with it."""
    window = await reports.telemetry_of(digest, after=after)
    assert window.errors == 0
    with InferenceClient(state_dir / "agent.sock", timeout=10) as api:
        assert api.info()["version"] == "1"
    active = SlotStore(state_dir).active()
    assert active is not None and active.metadata["version"] == "1"


@pytest.mark.timeout(150)
async def test_enospc_during_a_download_is_reported_cleaned_up_and_retried_slowly(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    digests = await release(fleet, model_files, tmp_path)
    faults = "download_enospc:1000000,spool_enospc:1,version:2"
    agent = configured_agent(fleet, DEVICE, env={"FLEET_AGENT_FAULTS": faults})
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
        reports = await ReportWatch.start(fleet.url_as(), DEVICE)
        try:
            agent.start()
            await deploy_and_wait(fleet, client, "1", [DEVICE])
            mark = reports.mark()
            await deploy(client, "2", [DEVICE])
            failed = await reports.status(proto.STATUS_FAILED, after=mark)
            assert "disk filled up" in failed.reason and "No space left" in failed.reason
            assert "partial download was removed" in failed.reason, failed.reason
            assert (failed.version, failed.digest) == ("2", digests["2"])
            assert not (agent.state_dir / "slots" / PARTIAL_NAME).exists()
            await still_serving_v1(reports, agent.state_dir, digests["1"], reports.mark())
            await fleet.feed.wait_for(
                lambda _: any("disk filled up" in e.payload["reason"] for e in
                              fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE)),
                what="the failure in the device's history")

            # Retried with backoff (1 s, 2 s, ...), reported once for the same reason.
            async def retried_twice() -> None:
                while "retry 2 in" not in agent.log():
                    await asyncio.sleep(0.1)

            await asyncio.wait_for(retried_twice(), 30)
            assert agent.log().count("retry ") <= 3, agent.log()[-3000:]
            again = [r for r in reports.reports[mark:]
                     if isinstance(r, proto.StatusReport) and r.event == proto.STATUS_FAILED]
            assert len(again) == 1, again
            assert not (agent.state_dir / "slots" / PARTIAL_NAME).exists()
            assert agent.running(), agent.log()[-3000:]
        finally:
            await reports.close()


@pytest.mark.timeout(120)
async def test_a_download_that_cannot_fit_is_refused_before_it_starts(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    digests = await release(fleet, model_files, tmp_path)
    faults = "disk_free:3000000,version:2"
    agent = configured_agent(fleet, DEVICE, env={"FLEET_AGENT_FAULTS": faults})
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
        reports = await ReportWatch.start(fleet.url_as(), DEVICE)
        try:
            agent.start()
            await deploy_and_wait(fleet, client, "1", [DEVICE])
            mark = reports.mark()
            await deploy(client, "2", [DEVICE])
            failed = await reports.status(proto.STATUS_FAILED, after=mark)
            assert "not enough disk space for kws/2" in failed.reason, failed.reason
            assert "3000000" in failed.reason
            assert not (agent.state_dir / "slots" / PARTIAL_NAME).exists()
            await still_serving_v1(reports, agent.state_dir, digests["1"], reports.mark())
        finally:
            await reports.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs; skipped with the reason where mounting is not allowed."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs for the agent's state")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a file that leaves about `leave` bytes free on `disk`."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "ab") as fh, contextlib.suppress(OSError):
        fh.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.timeout(240)
async def test_a_real_full_disk_under_the_agent_state(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path, small_disk: Path
) -> None:
    digests = await release(fleet, model_files, tmp_path)
    host, port = fleet.nats_url.rsplit("//", 1)[1].rsplit(":", 1)
    proxy = await TcpProxy.start(host, int(port))
    agent = configured_agent(fleet, DEVICE)
    agent.state_dir = small_disk / "state"
    agent.nats_url = proxy.url()
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
        reports = await ReportWatch.start(fleet.url_as(), DEVICE)
        try:
            agent.start()
            await deploy_and_wait(fleet, client, "1", [DEVICE])

            # The download starts (it fits), stalls, and meanwhile the disk fills up.
            mark = reports.mark()
            stalled = proxy.partition_after(1 << 20)
            await deploy(client, "2", [DEVICE])
            await asyncio.wait_for(stalled.wait(), 60)
            filler = fill(small_disk, 64 * 1024)
            proxy.heal()
            failed = await reports.status(proto.STATUS_FAILED, after=mark, timeout=60)
            assert "disk filled up" in failed.reason, failed.reason
            assert not (agent.state_dir / "slots" / PARTIAL_NAME).exists()
            await still_serving_v1(reports, agent.state_dir, digests["1"], reports.mark())
            # The retry's pre-check now refuses: the disk is still nearly full.
            refused = await reports.wait_for(
                lambda r: isinstance(r, proto.StatusReport)
                and r.event == proto.STATUS_FAILED and "not enough disk space" in r.reason,
                after=mark, timeout=60, what="the pre-check's refusal")
            assert isinstance(refused, proto.StatusReport) and refused.version == "2"

            # Space comes back: the agent installs kws/2 by itself, no new deploy.
            filler.unlink()
            applied = await reports.status(proto.STATUS_APPLIED, after=mark, timeout=90)
            assert (applied.version, applied.digest) == ("2", digests["2"])
            active = SlotStore(agent.state_dir).active()
            assert active is not None
            assert blake3.blake3(active.path.read_bytes()).hexdigest() == digests["2"]
            assert agent.running(), agent.log()[-3000:]
        finally:
            agent.stop()
            await reports.close()
            await proxy.close()
