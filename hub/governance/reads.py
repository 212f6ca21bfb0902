"""Read verbs of governance: `whoami`, `operators`, `models`, `model.show`,
`model.history` (every event about a model, with the operator keys that signed them)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import CommandError, Verbs
from hub.governance import state as governance
from ledger.storage import query


class GovernanceReads:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def handlers(self) -> Verbs:
        return Verbs(reads={
            "whoami": self.whoami,
            "operators": self.operators,
            "models": self.models,
            "model.show": self.model_show,
            "model.history": self.model_history,
        })

    @staticmethod
    def whoami(cmd: VerifiedCommand) -> Any:
        return {"name": cmd.operator.name, "keyid": cmd.operator.keyid,
                "roles": list(cmd.operator.roles)}

    def operators(self, cmd: VerifiedCommand) -> Any:
        with self.engine.connect() as conn:
            return governance.list_operators(conn)

    def models(self, cmd: VerifiedCommand) -> Any:
        name = cmd.body.get("name")
        with self.engine.connect() as conn:
            rows = governance.list_releases(conn, name if isinstance(name, str) else None)
        # A list stays small however many versions and outputs there are: each row's
        # validation is cut to its verdict (`hub model show` has the rest).
        for row in rows:
            row["validation"] = {k: v for k, v in row["validation"].items()
                                 if k in ("passed", "policy_digest", "detail")}
        return rows

    def model_show(self, cmd: VerifiedCommand) -> Any:
        name = cmd.body.get("name")
        if not isinstance(name, str):
            raise CommandError("missing 'name'")
        version = cmd.body.get("version")
        with self.engine.connect() as conn:
            rows = governance.list_releases(conn, name)
        if isinstance(version, str):
            rows = [r for r in rows if r["version"] == version]
        if not rows:
            raise CommandError(f"no model {name}{'/' + version if version else ''} registered")
        return rows

    def model_history(self, cmd: VerifiedCommand) -> Any:
        """Every event about a model, with the operator keys needed to check signatures."""
        name = cmd.body.get("name")
        if not isinstance(name, str) or not name:
            raise CommandError("missing 'name'")
        with self.engine.connect() as conn:
            entries = query.select_entries(
                conn, query.EntryFilter(subject_prefix=f"model:{name}/"), limit=None)
            operators = governance.list_operators(conn)
        events = [{"seq": e.seq, "ts": e.ts, "kind": e.kind, "actor": e.actor,
                   "subject": e.subject, "payload": e.payload} for e in entries]
        return {"events": events,
                "operators": [{"name": o["name"], "keyid": o["keyid"], "public": o["public"]}
                              for o in operators]}
