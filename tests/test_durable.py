"""ledger.durable.atomic_write: the one rule for files that must survive a crash."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.durable import atomic_write


class _Boom(Exception):
    pass


def _dies_midway() -> Iterator[bytes]:
    yield b"first half"
    raise _Boom


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    atomic_write(target, b"old")
    atomic_write(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert _leftovers(tmp_path) == []


def test_atomic_write_of_chunks(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "model.bin", iter([b"ab", b"", b"cd"]))
    assert target.read_bytes() == b"abcd"


def test_atomic_write_failure_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "never.bin"
    with pytest.raises(_Boom):
        atomic_write(target, _dies_midway())
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "kept.bin"
    atomic_write(target, b"old")
    with pytest.raises(_Boom):
        atomic_write(target, _dies_midway())
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_atomic_write_mode(tmp_path: Path, mode: int) -> None:
    old = os.umask(0o022)
    try:
        target = atomic_write(tmp_path / "f", b"x", mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == mode


def test_atomic_write_without_fsync_is_still_atomic(tmp_path: Path) -> None:
    target = tmp_path / "sim.bin"
    atomic_write(target, b"old", fsync=False)
    with pytest.raises(_Boom):
        atomic_write(target, _dies_midway(), fsync=False)
    assert target.read_bytes() == b"old"
