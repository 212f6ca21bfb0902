"""The network breaks under a model download: a real TCP proxy (testkit/tcp_proxy.py)
sits between the agent and nats-server.

- Every connection is reset (TCP RST) in the middle of a download, twice: the agent
  reconnects, resumes from the last chunk it has, and installs a file whose digest is
  the release's; no chunk is skipped, no byte lands at a wrong offset.
- The network is partitioned during a download for longer than the agent's transfer
  timeouts and its in-place retries, then heals: the agent retries with backoff and
  installs, without a new deploy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import pytest

from edge_agent.agent import AgentConfig, EdgeAgent
from edge_agent.download import PARTIAL_NAME
from edge_agent.slots import SlotStore
from hub import events as ev
from testkit.modelgen import model_for_version
from testkit.tcp_proxy import TcpProxy
from tests.device_kit import applied, deploy, deploy_and_wait
from tests.fleet import Fleet

DEVICE = "dev-0"
BIG = 4_000_000  # ~31 Object Store chunks of 128 KiB


@pytest.fixture
async def proxy(fleet: Fleet) -> AsyncIterator[TcpProxy]:
    host_port = fleet.nats_url.rsplit("//", 1)[1]
    host, port = host_port.rsplit(":", 1)
    proxy = await TcpProxy.start(host, int(port))
    try:
        yield proxy
    finally:
        await proxy.close()


async def release_big(fleet: Fleet, model_files: dict[str, Path], tmp_path: Path) -> str:
    big = tmp_path / "kws-v2-big.tflite"
    big.write_bytes(model_for_version(2, extra_bytes=BIG))
    await fleet.release_model(model_files["1"], "kws", "1")
    await fleet.release_model(big, "kws", "2")
    return blake3.blake3(big.read_bytes()).hexdigest()


async def until(condition: object, timeout: float, what: str) -> None:
    """Poll a condition on disk (no event to wait on there), with a timeout."""
    assert callable(condition)

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def assert_installed(state_dir: Path, digest: str) -> None:
    active = SlotStore(state_dir).active()
    assert active is not None and active.metadata["digest"] == digest
    assert blake3.blake3(active.path.read_bytes()).hexdigest() == digest
    assert not (state_dir / "slots" / PARTIAL_NAME).exists()


@pytest.mark.timeout(180)
async def test_connection_reset_mid_download_resumes_without_a_gap(
    fleet: Fleet, proxy: TcpProxy, model_files: dict[str, Path], tmp_path: Path
) -> None:
    digest = await release_big(fleet, model_files, tmp_path)
    agent = fleet.agent(DEVICE)
    agent.nats_url = proxy.url()
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
        agent.start()
        await deploy_and_wait(fleet, client, "1", [DEVICE])
        first = proxy.reset_after(1 << 20)
        await deploy(client, "2", [DEVICE])
        await asyncio.wait_for(first.wait(), 60)
        second = proxy.reset_after(1 << 20)  # once more, on the resumed transfer
        await asyncio.wait_for(second.wait(), 60)

    await fleet.feed.wait_for(lambda _: applied(fleet, DEVICE, "2"), timeout=90,
                              what=f"kws/2 applied after resets; log:\n{agent.log()[-3000:]}")
    assert proxy.resets >= 2
    assert_installed(agent.state_dir, digest)
    assert not fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE), agent.log()[-3000:]
    stats = json.loads((agent.state_dir / "stats.json").read_text())
    assert stats["download"]["resumed_after_error"] >= 1, stats


@pytest.mark.timeout(240)
async def test_partition_during_a_download_heals_and_the_agent_installs_by_itself(
    fleet: Fleet, proxy: TcpProxy, model_files: dict[str, Path], tmp_path: Path
) -> None:
    """An in-process agent, so the test can shorten its transfer timeouts: one in-place
    retry of a 2 s fetch, then the agent's own retry policy has to carry it."""
    logging.getLogger("edge_agent").setLevel(logging.INFO)
    digest = await release_big(fleet, model_files, tmp_path)
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
    bundle = fleet.bundle(DEVICE)
    state = tmp_path / "agent-state"
    agent = EdgeAgent(AgentConfig(
        device_id=DEVICE, nats_url=proxy.url(), state_dir=state,
        trust_root=fleet.config.trust_root_path, device_key=bundle / "device.key",
        window_seconds=0.5, serve_api=False, isolate_preflight=False,
        fetch_retries=1, fetch_timeout=2.0,
    ))
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:
        async with await fleet.client() as client:
            await deploy_and_wait(fleet, client, "1", [DEVICE])
            cut = proxy.partition_after(1 << 20)  # inside kws/2's download
            await deploy(client, "2", [DEVICE])
            await asyncio.wait_for(cut.wait(), 60)
            # Longer than a fetch timeout plus the in-place retries: the transfer fails.
            await asyncio.sleep(20.0)  # the partition's length (the fault), not a wait
            assert not applied(fleet, DEVICE, "2")
            proxy.heal()
        await fleet.feed.wait_for(lambda _: applied(fleet, DEVICE, "2"), timeout=120,
                                  what="kws/2 applied after the partition healed")
        assert_installed(state, digest)
        assert not fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE)
        assert agent.download_stats.resumed_after_error >= 1
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 15)
