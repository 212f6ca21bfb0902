"""The `status` read verb: the fleet at a glance for `hub status`.

Devices by state, the active rollouts, the last signed checkpoint (its age and the
witnesses that cosigned it), whether NATS and the database answer, and the state of
every background task (from the supervisor).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from hub.devices import state as device_state
from hub.log.checkpointer import load_witness_keys
from hub.rollouts import rules as ro
from hub.rollouts import state as rollout_state
from ledger.storage.checkpoint_store import CheckpointStore


def fleet_status(engine: Engine, checkpoints: CheckpointStore | None, witnesses_path: Path,
                 nats_connected: Callable[[], bool]) -> dict[str, Any]:
    """What `hub status` shows beside the ledger head and the tasks (times: ns)."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            devices = device_state.device_states(conn)
            rollouts = [{"rollout": r["rollout"], "model": r["model"],
                         "version": r["version"], "state": r["state"],
                         "wave": r["current_wave"] + 1, "target": r["target"]}
                        for r in rollout_state.list_rollouts(conn, ro.ACTIVE_STATES)]
        database: dict[str, Any] = {"reachable": True, "error": None}
    except Exception as exc:  # the status says so; it is the point of asking
        devices, rollouts = {}, []
        database = {"reachable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    try:
        listed = sorted(w.name for w in load_witness_keys(witnesses_path))
    except Exception:
        listed = []
    latest = checkpoints.latest() if checkpoints is not None else None
    checkpoint = None if latest is None else {
        "size": latest.size, "ts": latest.ts,
        "age_s": round(max(0.0, time.time() - latest.ts / 1e9), 3),
        "witnesses": sorted({s.name for s in latest.cosignatures}),
    }
    return {"devices": devices, "rollouts": rollouts, "checkpoint": checkpoint,
            "witnesses": listed, "database": database,
            "nats": {"reachable": nats_connected()}}
