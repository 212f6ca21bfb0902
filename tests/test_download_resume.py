"""A 50 MB download survives a NATS server restart and resumes where it stopped.

The agent is frozen (SIGSTOP) once part of the blob is on disk, so the server restart
lands mid-download however fast the transfer is; then it continues (SIGCONT), finds
its connection gone, reconnects by itself and resumes from the stream sequence after
the last chunk it received. Its stats file says how many bytes came over the wire.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import blake3
import pytest

from edge_agent.download import PARTIAL_NAME, SIDECAR_NAME
from edge_agent.slots import SlotStore
from hub import events as ev
from testkit.modelgen import model_for_version
from testkit.nats_server import EmbeddedNats
from tests.device_kit import applied, deploy, deploy_and_wait
from tests.fleet import Fleet

DEVICE = "dev-0"
BIG = 50_000_000


async def until(condition: Any, timeout: float, what: str) -> None:
    """Poll a condition on disk (no event to wait on there), with a timeout."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.002)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.mark.timeout(180)
async def test_download_resumes_after_the_nats_server_restarts_mid_transfer(
    fleet: Fleet, nats_server: EmbeddedNats, model_files: dict[str, Path], tmp_path: Path
) -> None:
    big = tmp_path / "kws-v2-50mb.tflite"
    big.write_bytes(model_for_version(2, extra_bytes=BIG))
    size = big.stat().st_size
    digest = blake3.blake3(big.read_bytes()).hexdigest()
    await fleet.release_model(model_files["1"], "kws", "1")
    await fleet.release_model(big, "kws", "2")

    agent = fleet.agent(DEVICE)
    partial = agent.state_dir / "slots" / PARTIAL_NAME
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
        agent.start()
        await deploy_and_wait(fleet, client, "1", [DEVICE])
        await deploy(client, "2", [DEVICE])

    # Part of the blob is on disk: freeze the agent, restart the server under it.
    await until(lambda: partial.exists() and partial.stat().st_size >= 4 << 20, 60,
                "the download to start")
    assert agent.process is not None
    os.kill(agent.process.pid, signal.SIGSTOP)
    try:
        on_disk = partial.stat().st_size
        assert on_disk < size, "the download finished before the server restart"
        nats_server.restart()
    finally:
        os.kill(agent.process.pid, signal.SIGCONT)

    await fleet.feed.wait_for(lambda _: applied(fleet, DEVICE, "2"), timeout=120,
                              what="kws/2 to be applied after the restart")

    active = SlotStore(agent.state_dir).active()
    assert active is not None and active.metadata["digest"] == digest
    assert blake3.blake3(active.path.read_bytes()).hexdigest() == digest
    assert not fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE)

    stats = json.loads((agent.state_dir / "stats.json").read_text())
    wire = stats["download"]["bytes_received"] - model_files["1"].stat().st_size
    assert stats["download"]["resumed_after_error"] >= 1, stats
    assert size <= wire < 1.5 * size, f"{wire} bytes over the wire for {size}: {stats}"
    # The blob streams to disk: memory grew by far less than the model while downloading.
    rss = stats["rss_kib"]
    growth_mib = (rss["download_max"] - rss["before_download"]) / 1024
    assert growth_mib < 20, f"peak memory grew {growth_mib:.0f} MiB during the download"
    assert "resuming" in agent.log()
    print(f"{on_disk} of {size} bytes on disk at the restart; {wire} bytes over the wire; "
          f"peak memory +{growth_mib:.1f} MiB during the download; {stats['download']}")


@pytest.mark.timeout(180)
async def test_download_resumes_from_disk_after_the_agent_is_killed_mid_transfer(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    big = tmp_path / "kws-v2-50mb.tflite"
    big.write_bytes(model_for_version(2, extra_bytes=BIG))
    size = big.stat().st_size
    await fleet.release_model(model_files["1"], "kws", "1")
    await fleet.release_model(big, "kws", "2")

    agent = fleet.agent(DEVICE)
    sidecar = agent.state_dir / "slots" / SIDECAR_NAME
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
        agent.start()
        await deploy_and_wait(fleet, client, "1", [DEVICE])
        await deploy(client, "2", [DEVICE])

    # Once a checkpoint is on disk, kill the agent (frozen first, so it is mid-transfer).
    await until(lambda: sidecar.exists(), 60, "the first download checkpoint")
    assert agent.process is not None
    os.kill(agent.process.pid, signal.SIGSTOP)
    checkpoint = json.loads(sidecar.read_text())
    assert checkpoint["received"] < size
    agent.kill()
    agent.start()

    await fleet.feed.wait_for(lambda _: applied(fleet, DEVICE, "2"), timeout=120,
                              what="kws/2 to be applied after the agent restart")
    stats = json.loads((agent.state_dir / "stats.json").read_text())
    assert stats["download"]["resumed_from_disk"] == 1, stats
    # The new process fetched only what the checkpoint did not have (plus torn bytes).
    wire = stats["download"]["bytes_received"]
    assert wire <= size - checkpoint["received"] + (4 << 20), stats
    active = SlotStore(agent.state_dir).active()
    assert active is not None and active.metadata["version"] == "2"
    assert blake3.blake3(active.path.read_bytes()).hexdigest() == active.metadata["digest"]
    assert not fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE)
