"""The agent's fast Object Store read path, on a real nats-server."""

from __future__ import annotations

import os
import subprocess
import sys

import blake3
import nats
import pytest

from edge_agent.errors import BlobTooLarge, FetchError
from edge_agent.transport.objects import iter_object_chunks
from testkit.nats_server import EmbeddedNats
from tests.fleet import REPO_ROOT


async def test_reads_a_multi_chunk_object_exactly(bare_nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(bare_nats_server.url)
    js = nc.jetstream()
    obs = await js.create_object_store("models")
    data = os.urandom(3 * 1024 * 1024 + 17)  # many 128 KiB chunks plus a partial one
    await obs.put("blob", data)
    got = bytearray()
    async for chunk in iter_object_chunks(nc, "models", "blob", len(data)):
        got += chunk
    assert bytes(got) == data
    await nc.close()


async def test_stops_at_the_stated_size_when_the_object_is_longer(
    bare_nats_server: EmbeddedNats,
) -> None:
    nc = await nats.connect(bare_nats_server.url)
    js = nc.jetstream()
    obs = await js.create_object_store("models")
    data = os.urandom(1024 * 1024)
    await obs.put("blob", data)
    received = 0
    with pytest.raises(BlobTooLarge, match="manifest says 1000"):
        async for chunk in iter_object_chunks(nc, "models", "blob", 1000):
            received += len(chunk)
    assert received == 0
    await nc.close()


async def test_missing_object_is_a_transfer_error(bare_nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(bare_nats_server.url)
    js = nc.jetstream()
    await js.create_object_store("models")
    with pytest.raises(FetchError, match="not in the object store"):
        async for _ in iter_object_chunks(nc, "models", blake3.blake3(b"x").hexdigest(), 1):
            pass
    await nc.close()


def test_importing_the_agent_pulls_in_neither_sqlalchemy_nor_the_hub() -> None:
    code = (
        "import sys, edge_agent.agent, edge_agent.cli, edge_agent.trust;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'sqlmodel', 'hub')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_endless_data_behind_lying_metadata_is_cut_off_at_the_stated_size(
    bare_nats_server: EmbeddedNats,
) -> None:
    """The metadata claims the honest size, but the chunk subject holds more bytes."""
    import base64
    import json

    nc = await nats.connect(bare_nats_server.url)
    js = nc.jetstream()
    obs = await js.create_object_store("models")
    data = os.urandom(256 * 1024)
    await obs.put("blob", data)
    info = await obs.get_info("blob")
    for _ in range(4):  # the attacker appends chunks and bumps the chunk count only
        await js.publish(f"$O.models.C.{info.nuid}", os.urandom(128 * 1024))
    meta = info.as_dict()
    meta["chunks"] = (info.chunks or 0) + 4
    name = base64.urlsafe_b64encode(b"blob").decode()
    await js.publish(f"$O.models.M.{name}", json.dumps(meta).encode(),
                     headers={"Nats-Rollup": "sub"})
    assert (await obs.get_info("blob")).size == len(data)

    received = 0
    with pytest.raises(BlobTooLarge, match="longer than"):
        async for chunk in iter_object_chunks(nc, "models", "blob", len(data)):
            received += len(chunk)
    assert received == len(data)  # everything up to the stated size, and not a byte more
    await nc.close()
