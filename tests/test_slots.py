"""A/B slots: switch, revert bookkeeping, and crash safety."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.slots import SlotStore


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_fresh_store_has_no_active_model(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    assert store.active() is None
    assert store.previous() is None
    assert store.inactive_name() == "a"


def test_write_activate_switch_and_previous(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)

    path_a = store.write_inactive([b"model-", b"one"])
    assert path_a == tmp_path / "slots" / "a.tflite"
    store.activate("a", {"model": "m", "version": 1})
    active = store.active()
    assert active is not None
    assert (active.name, active.path) == ("a", path_a)
    assert active.metadata == {"model": "m", "version": 1}
    assert store.previous() is None
    assert store.inactive_name() == "b"

    path_b = store.write_inactive([b"model-two"])
    assert path_b == tmp_path / "slots" / "b.tflite"
    assert path_a.read_bytes() == b"model-one"  # the active slot is never touched
    store.activate("b", {"model": "m", "version": 2})

    active, previous = store.active(), store.previous()
    assert active is not None and previous is not None
    assert (active.name, active.metadata["version"]) == ("b", 2)
    assert (previous.name, previous.metadata["version"]) == ("a", 1)
    assert previous.path.read_bytes() == b"model-one"

    # Revert: the previous slot becomes active again, and what we left is now previous.
    store.activate(previous.name, previous.metadata)
    active, previous = store.active(), store.previous()
    assert active is not None and previous is not None
    assert (active.name, previous.name) == ("a", "b")
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "slots") == []


def test_state_survives_a_new_store_instance(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    store.write_inactive([b"x"])
    store.activate("a", {"digest": "abc"})
    again = SlotStore(tmp_path).active()
    assert again is not None and again.metadata == {"digest": "abc"}


def test_overwriting_previous_slot_forgets_it(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    store.write_inactive([b"v1"])
    store.activate("a", {"version": 1})
    store.write_inactive([b"v2"])
    store.activate("b", {"version": 2})
    assert store.previous() is not None
    # Slot a is now being replaced by v3: it no longer holds v1, so no revert to "v1".
    store.write_inactive([b"v3"])
    assert store.previous() is None
    active = store.active()
    assert active is not None and active.metadata == {"version": 2}


def test_activate_rejects_unknown_or_empty_slot(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    with pytest.raises(ValueError, match="slot must be one of"):
        store.activate("c", {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.activate("b", {})


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        b'{"active": {"slot": "z", "metadata": {}}}',
        b'{"active": {"slot": "a", "metadata": "nope"}}',
        b"\xff\xfe\x00garbage",
    ],
)
def test_corrupt_active_json_means_no_active_model(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    store = SlotStore(tmp_path)
    store.write_inactive([b"model"])
    (tmp_path / "active.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="edge_agent.slots"):
        assert store.active() is None
    assert "active.json" in caplog.text
    assert store.inactive_name() == "a"
    # The store recovers: activating writes a fresh, valid state file.
    store.activate("a", {"version": 1})
    active = store.active()
    assert active is not None and active.metadata == {"version": 1}


def test_active_slot_file_missing_is_no_active_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SlotStore(tmp_path)
    store.write_inactive([b"model"])
    store.activate("a", {})
    (tmp_path / "slots" / "a.tflite").unlink()
    with caplog.at_level(logging.WARNING, logger="edge_agent.slots"):
        assert store.active() is None
    assert "missing" in caplog.text


class _Boom(Exception):
    pass


def _dies_midway() -> Iterator[bytes]:
    yield b"new-bytes-part-1"
    raise _Boom("connection lost")


def test_write_dying_midway_keeps_old_slot_content(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    store.write_inactive([b"v1"])
    store.activate("a", {"version": 1})
    store.write_inactive([b"v2-complete"])

    # Rewrite the inactive slot b and die midway: b keeps its last complete content.
    assert store.inactive_name() == "b"
    with pytest.raises(_Boom):
        store.write_inactive(_dies_midway())
    assert (tmp_path / "slots" / "b.tflite").read_bytes() == b"v2-complete"
    assert (tmp_path / "slots" / "a.tflite").read_bytes() == b"v1"
    assert _leftovers(tmp_path / "slots") == []


def test_discard_stale_temp_files(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    # What a power cut during a write leaves behind.
    (tmp_path / "slots" / ".b.tflite.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".active.json.xyz.tmp").write_bytes(b"{")
    assert store.discard_stale_temp_files() == 2
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "slots") == []


def test_state_file_is_plain_json(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    store.write_inactive([b"m"])
    store.activate("a", {"counter": 3})
    state = json.loads((tmp_path / "active.json").read_text())
    assert state["active"] == {"slot": "a", "metadata": {"counter": 3}}
    assert state["previous"] is None
