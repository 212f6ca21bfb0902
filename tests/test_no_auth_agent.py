"""The agent's transport on a server without auth (`hub init --no-auth`: one global
account, no users): the direct gets, the hints and the report publish use the same
subjects as under NATS accounts (docs/PROTOCOL.md "Permissions"), so a real agent takes
a release, reports it, and takes the next one from a hint.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hub import events as ev
from hub.home.config import init_home
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(180)


def applied(fleet: Fleet, device: str, version: str) -> bool:
    return any(e.payload["version"] == version
               for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, device))


async def test_an_agent_installs_from_a_server_without_auth(
        tmp_path: Path, bare_nats_server: EmbeddedNats, model_files: dict[str, Path]) -> None:
    init_home(tmp_path / "hub", bare_nats_server.url, nats_auth=False)
    fleet = await Fleet(tmp_path, bare_nats_server.url).start()
    try:
        async with await fleet.client() as client:
            await fleet.release_model(model_files["1"], "kws", "1")
            await client.call("device.enroll", {"device": "dev-0"})
            fleet.agent("dev-0").start()
            for version in ("1", "2"):
                if version == "2":
                    await fleet.release_model(model_files["2"], "kws", "2")
                await client.call("deploy", {"model": "kws", "version": version,
                                             "devices": ["dev-0"]})
                await fleet.feed.wait_for(lambda _, v=version: applied(fleet, "dev-0", v),
                                          timeout=60, what=f"dev-0 to apply kws/{version}")
    finally:
        await fleet.stop()
