"""Layering checked at run time: what the device imports from the ledger pulls in no
database and no NATS client.

Each top-level `ledger/*.py` module is imported in a fresh interpreter (so nothing loaded
by another test hides a bad import), then `sys.modules` must hold no SQLAlchemy, SQLModel
or nats-py module. A lazy import inside a function is not caught here; ledger/*.py has
none (they would still break the rule, and review would catch them).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ledger

LEDGER_DIR = Path(ledger.__file__).parent
PURE_MODULES = sorted(
    f"ledger.{path.stem}" for path in LEDGER_DIR.glob("*.py") if path.stem != "__init__"
)
FORBIDDEN = ("sqlalchemy", "sqlmodel", "nats")

_PROBE = """
import importlib, sys
importlib.import_module(sys.argv[1])
roots = {name.split(".")[0] for name in sys.modules}
print(" ".join(sorted(roots & set(sys.argv[2:]))))
"""


def test_the_pure_module_list_is_not_empty() -> None:
    assert "ledger.merkle" in PURE_MODULES and "ledger.durable" in PURE_MODULES


@pytest.mark.parametrize("module", PURE_MODULES)
def test_ledger_pure_modules_import_no_storage(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, module, *FORBIDDEN],
        capture_output=True, text=True, timeout=60, cwd=LEDGER_DIR.parent, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{module} imports {done.stdout.strip()}"
