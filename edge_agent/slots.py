"""A/B model slots on disk that survive a crash or power cut at any point.

Layout under `state_dir`:

    slots/a.tflite, slots/b.tflite   the two model slots
    active.json                      {"active": {...}, "previous": {...} | null}

Every file is replaced, never rewritten in place: data goes to a temp file in the same
directory, is fsynced, renamed over the target, and the directory is fsynced so the
rename itself is durable. A reader therefore sees the old file or the new one, never
half of either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.durable import TMP_SUFFIX, atomic_write, fsync_dir

__all__ = ["SLOT_NAMES", "ActiveSlot", "SlotStore"]

log = logging.getLogger(__name__)

SLOT_NAMES = ("a", "b")
_STATE_FORMAT = 1


@dataclass(frozen=True)
class ActiveSlot:
    name: str  # "a" or "b"
    path: Path
    metadata: dict[str, Any]  # whatever the caller passed to `activate`


class SlotStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.slots_dir = self.state_dir / "slots"
        self.state_path = self.state_dir / "active.json"
        self.slots_dir.mkdir(parents=True, exist_ok=True)

    def slot_path(self, slot: str) -> Path:
        if slot not in SLOT_NAMES:
            raise ValueError(f"slot must be one of {SLOT_NAMES}, got {slot!r}")
        return self.slots_dir / f"{slot}.tflite"

    def active(self) -> ActiveSlot | None:
        return self._entry("active")

    def previous(self) -> ActiveSlot | None:
        return self._entry("previous")

    def active_record(self) -> ActiveSlot | None:
        """The active slot as recorded, even if its file is gone (a boot check tells a
        deleted model from "nothing installed yet")."""
        return self._entry("active", need_file=False)

    def inactive_name(self) -> str:
        current = self.active()
        if current is None:
            return SLOT_NAMES[0]
        return SLOT_NAMES[1] if current.name == SLOT_NAMES[0] else SLOT_NAMES[0]

    def write_inactive(self, chunks: Iterable[bytes]) -> Path:
        """Replace the inactive slot's file with `chunks`; returns its path.

        The active slot is never touched. If the inactive slot holds the `previous`
        model, that record is dropped first, so a revert can never load the new bytes
        thinking they are the old model.
        """
        slot = self.inactive_name()
        state = self._read_state()
        if state is not None and self._slot_of(state.get("previous")) == slot:
            state["previous"] = None
            self._write_state(state)
        return atomic_write(self.slot_path(slot), chunks)

    def install_inactive(self, source: Path) -> str:
        """Move the complete file `source` into the inactive slot; returns the slot name.

        `source` must be in the same directory as the slots (a rename, not a copy) and
        already fsynced. As with `write_inactive`, a `previous` record naming that slot
        is dropped first.
        """
        slot = self.inactive_name()
        state = self._read_state()
        if state is not None and self._slot_of(state.get("previous")) == slot:
            state["previous"] = None
            self._write_state(state)
        os.replace(source, self.slot_path(slot))
        fsync_dir(self.slots_dir)
        return slot

    def activate(self, slot: str, metadata: dict[str, Any]) -> None:
        """Make `slot` active; the slot active until now becomes `previous`."""
        path = self.slot_path(slot)
        if not path.is_file():
            raise FileNotFoundError(f"cannot activate slot {slot!r}: {path} does not exist")
        state = self._read_state() or {}
        current = state.get("active")
        # Re-activating the active slot must not make it its own revert target.
        replacing = self._slot_of(current) not in (None, slot)
        previous = current if replacing else state.get("previous")
        self._write_state(
            {
                "format": _STATE_FORMAT,
                "active": {"slot": slot, "metadata": dict(metadata)},
                "previous": previous,
            }
        )

    def revert(self) -> ActiveSlot:
        """Make the previous slot active again, in one atomic write of the state file.

        The slot we leave is not kept as a revert target (it is the one that failed),
        so `previous()` is None afterwards. Raises LookupError if there is no previous
        slot to go back to.
        """
        previous = self.previous()
        if previous is None:
            raise LookupError("no previous model to revert to")
        self._write_state(
            {
                "format": _STATE_FORMAT,
                "active": {"slot": previous.name, "metadata": dict(previous.metadata)},
                "previous": None,
            }
        )
        return previous

    def forget(self) -> None:
        """Record that no slot holds a usable model (both failed their boot check): the
        next install starts from nothing instead of keeping a bad slot as `previous`."""
        self._write_state({"format": _STATE_FORMAT, "active": None, "previous": None})

    def discard_stale_temp_files(self) -> int:
        """Remove temp files left by writes that died midway; call once at agent start."""
        removed = 0
        for directory in (self.slots_dir, self.state_dir):
            for tmp in directory.glob(f".*{TMP_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    removed += 1
        return removed

    # -- state file ------------------------------------------------------------

    def _write_state(self, state: dict[str, Any]) -> None:
        data = json.dumps(state, sort_keys=True, indent=2).encode() + b"\n"
        atomic_write(self.state_path, data)

    def _read_state(self) -> dict[str, Any] | None:
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read %s (%s); treating as no active model", self.state_path, exc)
            return None
        try:
            state = json.loads(raw)
        except ValueError as exc:
            log.warning("%s is corrupt (%s); treating as no active model", self.state_path, exc)
            return None
        if not isinstance(state, dict):
            log.warning("%s is not a JSON object; treating as no active model", self.state_path)
            return None
        return state

    @staticmethod
    def _slot_of(entry: Any) -> str | None:
        if isinstance(entry, dict) and entry.get("slot") in SLOT_NAMES:
            return str(entry["slot"])
        return None

    def _entry(self, key: str, need_file: bool = True) -> ActiveSlot | None:
        state = self._read_state()
        if state is None:
            return None
        entry = state.get(key)
        if entry is None:
            return None
        slot = self._slot_of(entry)
        metadata = entry.get("metadata") if isinstance(entry, dict) else None
        if slot is None or not isinstance(metadata, dict):
            log.warning("%s has a malformed %r record: %r", self.state_path, key, entry)
            return None
        path = self.slot_path(slot)
        if need_file and not path.is_file():
            log.warning(
                "%s names slot %r as %s but %s is missing", self.state_path, slot, key, path
            )
            return None
        return ActiveSlot(name=slot, path=path, metadata=metadata)
