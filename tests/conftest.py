"""Shared fixtures: a real nats-server per test, a hub home, real .tflite models."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hub.embedded_nats import EmbeddedNats
from hub.modelgen import model_for_version
from tests.fleet import Fleet


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(store_dir=tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def model_files(tmp_path: Path) -> dict[str, Path]:
    """Real TFLite models whose outputs differ by version."""
    out = {}
    for version in ("1", "2", "3"):
        path = tmp_path / "models" / f"kws-v{version}.tflite"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model_for_version(int(version)))
        out[version] = path
    return out


@pytest.fixture
async def fleet(tmp_path: Path, nats_server: EmbeddedNats) -> AsyncIterator[Fleet]:
    fleet = await Fleet(tmp_path, nats_server.url).start()
    try:
        yield fleet
    finally:
        await fleet.stop()
