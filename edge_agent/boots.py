"""The agent's boot counter: one more at every start on a state directory.

Reports carry `boot` = "<boot counter>-<random hex>" (edge_agent.protocol.boot_id) and a
per-boot `seq`, both signed with the status report, so the hub orders a device's status
reports across boots by (boot counter, seq) and refuses one that is not above the last
it recorded: a captured report of an earlier boot cannot be appended again.

The counter is kept in STATE_DIR/boot-counter, written (fsynced) before the first
report of the boot. It is at least the Unix time in seconds, so a device whose state
directory was wiped still starts above every boot it had (if its clock is right; else
the hub refuses its status reports until the counter passes the last recorded one, and
counts them as `replay`).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from edge_agent.protocol import boot_id
from ledger.durable import atomic_write

BOOT_COUNTER_NAME = "boot-counter"


def next_boot(state_dir: Path, now: float | None = None) -> str:
    """Count this start and return its boot id ("<counter>-<random hex>")."""
    path = state_dir / BOOT_COUNTER_NAME
    try:
        last = int(path.read_text().strip())
    except (OSError, ValueError):
        last = 0
    counter = max(last + 1, int(time.time() if now is None else now))
    atomic_write(path, f"{counter}\n".encode())
    return boot_id(counter, secrets.token_hex(4))
