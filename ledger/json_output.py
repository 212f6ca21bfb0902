"""Printing a command's `--json` document, checked against its schema when asked.

Each of the three CLIs (`hub`, `ledger`, `edge-agent`) prints every `--json` document
through `emit` here, so one place serializes it and, when the environment variable
FLEET_CHECK_JSON_SCHEMAS is `1` (the test suite sets it for the whole run, so CLIs run
as subprocesses inherit it), validates the printed document against
docs/schemas/TOOL/COMMAND.schema.json (docs/CLI-JSON.md) before printing it. A document
that does not match, or a command without a schema file, ends the command with exit 70
(EX_SOFTWARE) and the validation error on stderr: a change to the output that breaks
its documented shape fails whichever test runs that command.

Production never sets the variable, so `jsonschema` (a dev dependency) is imported only
when it is set. This module lives in `ledger` because it is the one package all three
CLIs may import (pyproject.toml [tool.importlinter]); it does no I/O but reading the
schema files and printing.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "CHECK_ENV",
    "EXIT_SCHEMA",
    "LOG_ENV",
    "SCHEMA_DIR",
    "check",
    "checking",
    "command_words",
    "emit",
    "schema_path",
]

CHECK_ENV = "FLEET_CHECK_JSON_SCHEMAS"
# With the check on, each command whose document passed is appended to this file, one
# `TOOL WORDS...` line each (tests/conftest.py: which schemas a test run exercised).
LOG_ENV = "FLEET_JSON_SCHEMA_LOG"
EXIT_SCHEMA = 70  # EX_SOFTWARE (sysexits.h): the program broke its own contract
# The schemas are documentation first (docs/CLI-JSON.md links them); they are read from
# the source tree, which is where the check runs (tests, a developer's checkout).
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"
# Every schema's $id sits under this base, so `../defs.schema.json#/$defs/time` in
# docs/schemas/hub/x.schema.json resolves to docs/schemas/defs.schema.json, for the
# check here as for an editor that resolves the reference as a relative file.
SCHEMA_BASE = "https://schemas.fleetledger.invalid/"


def checking() -> bool:
    return os.environ.get(CHECK_ENV) == "1"


def schema_path(tool: str, words: tuple[str, ...]) -> Path:
    """docs/schemas/hub/device-show.schema.json for `hub device show`."""
    return SCHEMA_DIR / tool / f"{'-'.join(words)}.schema.json"


def command_words() -> tuple[str, ...]:
    """The running click command's path below the tool: ("device", "show") for
    `hub device show`. The root's own name is left out: it is `python -m hub.cli`,
    `__main__.py` or `hub` depending on how the CLI was started."""
    import importlib

    # typer (0.2x) runs its own vendored copy of click, whose context stack is not
    # click's, and exposes no accessor of its own: use whichever click typer runs.
    try:
        globals_ = importlib.import_module("typer._click.globals")
    except ImportError:
        globals_ = importlib.import_module("click.globals")
    ctx: Any = globals_.get_current_context(silent=True)
    words: list[str] = []
    while ctx is not None and ctx.parent is not None:
        words.append(ctx.info_name or "")
        ctx = ctx.parent
    return tuple(reversed(words))


def emit(tool: str, document: Any, *, indent: int | None = None,
         default: Callable[[Any], Any] | None = None) -> None:
    """Print `document` as one JSON document (one line unless `indent`), after checking
    it against the running command's schema when FLEET_CHECK_JSON_SCHEMAS=1."""
    text = json.dumps(document, indent=indent, default=default)
    if checking():
        # The check reads back what is printed: `default` (bytes as hex, say) is applied.
        check(tool, command_words(), json.loads(text))
    print(text, flush=True)


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_SCHEMA)


def check(tool: str, words: tuple[str, ...], document: Any) -> None:
    """Validate `document` against the schema of `tool words...`; print the error and
    exit EXIT_SCHEMA if it does not match or there is no schema."""
    path = schema_path(tool, words)
    command = " ".join((tool, *words))
    if not path.is_file():
        _fail(f"`{command} --json` has no schema: write {path} "
              f"(docs/CLI-JSON.md; {CHECK_ENV}=1 is set)")
    validator = _validator(str(path))
    # Sorted by path as text: a path mixes list indexes and keys, which do not compare.
    errors = sorted(validator.iter_errors(document),
                    key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        shown = "; ".join(
            f"at {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in errors[:5])
        _fail(f"`{command} --json` does not match {path.relative_to(SCHEMA_DIR.parent.parent)}"
              f" ({len(errors)} error(s)): {shown}")
    log = os.environ.get(LOG_ENV)
    if log:
        # One short line in append mode: concurrent CLIs do not interleave within it.
        with open(log, "a", encoding="utf-8") as f:
            f.write(command + "\n")


@cache
def _validator(path: str) -> Any:
    # Imported here: only a checking run needs jsonschema (the `dev` extra).
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    registry: Registry[Any] = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc))
        for doc in (json.loads(p.read_text()) for p in SCHEMA_DIR.rglob("*.schema.json"))
    )
    schema = json.loads(Path(path).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry,
                                format_checker=Draft202012Validator.FORMAT_CHECKER)
