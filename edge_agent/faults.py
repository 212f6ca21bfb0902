"""A test hook: faults injected into a running agent, never set on a real device.

The environment variable FLEET_AGENT_FAULTS (or AgentConfig.faults) is a comma
separated list of `key:value` items:

    error_rate:R     fail that fraction of inferences
    load_error:1     the active model fails to load at start
    install_error:1  refuse to install
    output_shift:X   add X to every output before it is counted (drift)
    version:V        only while a model of version V is active (or being installed)
    download_enospc:N  a download's file write fails with ENOSPC once N bytes are written
    spool_enospc:1   every write to the report spool fails with ENOSPC (the disk is full)
    disk_free:N      the free space the download pre-check sees, in bytes

Example: `FLEET_AGENT_FAULTS=error_rate:1.0,version:2`. Used by tests/test_health_revert.py,
tests/test_faults.py and the fleet simulator (testkit/fleet_sim.py).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

FAULTS_ENV = "FLEET_AGENT_FAULTS"


@dataclass(frozen=True)
class Faults:
    """Injected faults (see the module docstring); none by default."""

    error_rate: float = 0.0
    load_error: bool = False
    version: str | None = None
    install_error: bool = False  # refuse to install (the assignment's version must match)
    output_shift: float = 0.0  # added to every output before it is counted (drift)
    download_enospc: int | None = None  # bytes a download writes before ENOSPC
    spool_enospc: bool = False  # every spool write fails with ENOSPC
    disk_free: int | None = None  # what the download pre-check sees as free space

    @classmethod
    def parse(cls, spec: str) -> Faults:
        values: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            key, _, value = item.partition(":")
            values[key.strip()] = value.strip()
        try:
            return cls(
                error_rate=float(values.get("error_rate", 0.0)),
                load_error=values.get("load_error", "0") not in ("", "0", "false"),
                version=values.get("version") or None,
                install_error=values.get("install_error", "0") not in ("", "0", "false"),
                output_shift=float(values.get("output_shift", 0.0)),
                download_enospc=_optional_int(values.get("download_enospc")),
                spool_enospc=values.get("spool_enospc", "0") not in ("", "0", "false"),
                disk_free=_optional_int(values.get("disk_free")),
            )
        except ValueError as exc:
            raise ValueError(f"{FAULTS_ENV}={spec!r} is not valid: {exc}") from exc

    @classmethod
    def configured(cls, spec: str | None) -> Faults:
        """`spec`, or the environment's FLEET_AGENT_FAULTS when `spec` is None."""
        return cls.parse(spec if spec is not None else os.environ.get(FAULTS_ENV, ""))

    def applies(self, meta: dict[str, Any]) -> bool:
        return self.version is None or str(meta.get("version")) == self.version


def _optional_int(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)


def enospc(what: str) -> OSError:
    """The OSError a full disk raises, injected."""
    return OSError(errno.ENOSPC, f"No space left on device (injected by {FAULTS_ENV}: {what})")
