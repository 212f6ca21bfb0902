"""Replace a file atomically and durably: the one rule for every file that must survive a crash.

The rule: write a temp file in the same directory, fsync it, rename it over the target, then
fsync the directory. A reader (or a restart after a power cut) sees the old file or the new
one, never half of either, and once `atomic_write` returns the new file is on disk. The temp
file sits in the target's directory because a rename is atomic only within one file system.

Pure standard library, so the device, the hub and the ledger share it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

__all__ = ["TMP_SUFFIX", "atomic_write", "fsync_dir"]

# Temp files end in this, so an owner that finds leftovers (a write that never reached its
# rename) can delete them by pattern.
TMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    """Make a rename into `directory` durable (for callers that rename a file they fsynced)."""
    # Without this the rename may be lost on power failure even though the data is safe.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Iterable[bytes], mode: int = 0o600, *,
                 fsync: bool = True) -> Path:
    """Replace `path` with `data` (bytes, or an iterable of chunks); on any error it is untouched.

    `mode` is the new file's permission bits (the umask applies, as for `open`); the default
    is private, since most callers write state or key material. `fsync=False` keeps the
    atomic rename but skips both fsyncs: only for throwaway state (simulated devices in tests
    and benchmarks) where speed matters more than surviving a power cut.

    The temp file is removed if anything (the chunk iterator included) raises.
    """
    path = Path(path)
    chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)
    return path
