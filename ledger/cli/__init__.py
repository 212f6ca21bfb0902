"""`ledger`: check and inspect a fleetledger ledger database without trusting the hub.

Each command group is a module of plain functions (show.py, audit.py, witness.py,
browse.py, at.py, report.py) over the shared helpers of _common.py; this module registers them on
the one typer app, in the order `ledger --help` lists them, each with the examples of its help.
"""

from __future__ import annotations

from ledger.cli import at, audit, browse, report, show, witness
from ledger.cli._common import app, examples

__all__ = ["app", "main"]

DB = "--db hub-home/ledger.db"
VKEY = "--log-key hub-home/log.vkey"

for _name, _command, _examples in (
    ("show", show.show, (f"ledger show {DB}", "ledger show --home hub-home --last 5 --json")),
    ("root", show.root, (f"ledger root {DB}", f"ledger root {DB} --size 10 --json")),
    ("prove", show.prove, (f"ledger prove {DB} --seq 3",
                           f"ledger prove {DB} --seq 3 --out seq3.bundle")),
    ("verify", audit.verify, (
        f"ledger verify {DB}",
        f"ledger verify --home hub-home {VKEY}",
        f"ledger verify ledger.export {VKEY} --witness-key w1.key.vkey",
        f"ledger verify {DB} {VKEY} --since-checkpoint cp.note",
        "LEDGER_DB=hub-home/ledger.db ledger verify --json")),
    ("export", audit.export, (f"ledger export {DB} ledger.export",
                              f"ledger verify ledger.export {VKEY}")),
    ("verify-bundle", audit.verify_bundle_cmd, (
        f"ledger verify-bundle seq3.bundle {VKEY}",
        f"ledger verify-bundle seq3.bundle {VKEY} --witness-key w1.key.vkey")),
    ("witness-key", witness.witness_key, (
        "ledger witness-key --out w1.key --name witness.example/w1",)),
    ("witness", witness.witness, (
        "ledger witness --nats nats://127.0.0.1:4222 --nats-user witness "
        "--nats-password-file w1.pass --log-key hub-home/log.vkey --key w1.key "
        "--name witness.example/w1 --state w1-state.json --once",
        "ledger witness --nats nats://127.0.0.1:4222 --nats-user witness "
        "--nats-password-file w1.pass --log-key hub-home/log.vkey --key w1.key "
        "--name witness.example/w1 --state w1-state.json --log-format json")),
    ("checkpoint", audit.checkpoint_cmd, (f"ledger checkpoint {DB}",
                                          f"ledger checkpoint {DB} --out cp.note")),
    ("query", browse.query, (
        f"ledger query {DB} --kind model.released --subject model:kws/",
        f"ledger query {DB} --subject device:dev-1 --since 2024-05-01T00:00:00Z --json")),
    ("at", at.at, (
        "ledger at --home hub-home --device dev-1 --time 2024-05-01T12:00:00Z",
        "ledger at --export ledger.export --device dev-1 --time now --json",
        f"ledger at {DB} --device dev-1 --time now --out proof/ {VKEY}")),
    ("report", report.report, (
        f"ledger report {DB} --out report.html {VKEY}",
        "ledger report --home hub-home --out report.html --device dev-1 "
        "--from 2024-05-01T00:00:00Z --to 2024-06-01T00:00:00Z",
        "ledger report --export ledger.export --out report.html --log-key log.vkey "
        "--witness-key w1.key.vkey")),
    ("tail", browse.tail, (f"ledger tail {DB} -n 20", f"ledger tail {DB} --follow",
                           "ledger tail --follow --nats nats://127.0.0.1:4222 "
                           "--nats-user witness --nats-password-file w1.pass")),
):
    app.command(_name, epilog=examples(*_examples))(_command)


def main() -> None:
    app(prog_name="ledger")
