"""`ledger`: check and inspect a fleetledger ledger database without trusting the hub.

Each command group is a module of plain functions (show.py, audit.py, witness.py,
browse.py) over the shared helpers of _common.py; this module registers them on the one
typer app, in the order `ledger --help` lists them.
"""

from __future__ import annotations

from ledger.cli import audit, browse, show, witness
from ledger.cli._common import app

__all__ = ["app", "main"]

for _name, _command in (
    ("show", show.show),
    ("root", show.root),
    ("prove", show.prove),
    ("verify", audit.verify),
    ("export", audit.export),
    ("verify-bundle", audit.verify_bundle_cmd),
    ("witness-key", witness.witness_key),
    ("witness", witness.witness),
    ("checkpoint", audit.checkpoint_cmd),
    ("query", browse.query),
    ("tail", browse.tail),
):
    app.command(_name)(_command)


def main() -> None:
    app(prog_name="ledger")
