"""`ledger at`: the auditor's question answered from the ledger alone, on a real fleet.

A hub, one agent, two operators (the admin registers and releases, `approver`
approves); kws/1 then kws/2 are deployed. `ledger at` must name the version that ran
at a time, its approver by name, the validation numbers, check every signature, and
write proof bundles `ledger verify-bundle` accepts; the same from an export file.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hub import events as ev
from ledger.cli import app
from ledger.encoding import canonical_decode, canonical_encode
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(180)


def ledger(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def at(db: str, device: str, t: int, *more: str) -> tuple[int, dict[str, Any]]:
    code, out = ledger("at", "--db", db, "--device", device, "--time", str(t), "--json", *more)
    return code, json.loads(out)


async def test_ledger_at_names_the_release_its_approver_and_the_evidence(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    async with await fleet.client() as client:
        await fleet.release_model(model_files["1"], "kws", "1")
        await client.call("device.enroll", {"device": "dev-0"})
        fleet.agent("dev-0").start()

        def applied(version: str) -> bool:
            return any(e.payload["version"] == version
                       for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, "dev-0"))

        await client.call("deploy", {"model": "kws", "version": "1", "devices": ["dev-0"]})
        await fleet.feed.wait_for(lambda _: applied("1"), 60, "kws/1 applied")
        await fleet.release_model(model_files["2"], "kws", "2")
        await client.call("deploy", {"model": "kws", "version": "2", "devices": ["dev-0"]})
        await fleet.feed.wait_for(lambda _: applied("2"), 60, "kws/2 applied")
    await fleet.hub.ledger_publishing.checkpointer.sign_now()
    reports = fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, "dev-0")
    v1, v2 = reports[0], reports[-1]
    db = fleet.config.database_url()
    vkey = str(fleet.config.home / "log.vkey")

    # Before any install: nothing ran.
    code, doc = at(db, "dev-0", v1.ts - 1)
    assert (code, doc["found"]) == (1, False)

    # Between the installs: kws/1, approved by `approver`, with its validation numbers.
    code, doc = at(db, "dev-0", v2.ts - 1, "--out", str(tmp_path / "proof"), "--log-key", vkey)
    assert code == 0, doc
    assert (doc["model"], doc["version"], doc["applied"]["seq"]) == ("kws", "1", v1.seq)
    assert doc["changed_later"]["version"] == "2"
    assert [a["by"] for a in doc["approvals"]] == ["approver"]
    assert doc["registered"]["by"] == "admin" and doc["released"]["by"] == "admin"
    assert doc["validated"]["passed"] is True and doc["validated"]["metrics"]
    assert doc["manifest_hash"] and doc["assignment"]["counter"] == v1.payload["counter"]
    assert all(c["ok"] for c in doc["checks"]) and len(doc["checks"]) >= 5
    assert doc["applied"]["signature"] == "valid"
    assert len(doc["bundles"]) >= 6
    for bundle in doc["bundles"]:
        code, out = ledger("verify-bundle", bundle, "--log-key", vkey)
        assert code == 0, out

    # After v2: kws/2; the text form says who approved it.
    code, doc = at(db, "dev-0", v2.ts)
    assert (code, doc["version"], doc["changed_later"]) == (0, "2", None)
    code, out = ledger("at", "--db", db, "--device", "dev-0", "--time", "now")
    assert code == 0 and "kws/2 ran on dev-0" in out and "approved          by approver" in out

    # The same answer from an export file, bundles included.
    export = tmp_path / "ledger.export"
    assert ledger("export", "--db", db, str(export))[0] == 0
    code, out = ledger("at", "--export", str(export), "--device", "dev-0", "--time",
                       str(v2.ts - 1), "--json", "--out", str(tmp_path / "xproof"),
                       "--log-key", vkey)
    assert code == 0, out
    xdoc = json.loads(out)
    assert (xdoc["version"], [a["by"] for a in xdoc["approvals"]]) == ("1", ["approver"])
    for bundle in xdoc["bundles"]:
        assert ledger("verify-bundle", bundle, "--log-key", vkey)[0] == 0

    # A tampered approval signature (in a copy of the database) is named.
    tampered = tmp_path / "tampered.db"
    with sqlite3.connect(db) as live:
        con = sqlite3.connect(tampered)
        live.backup(con)
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        con.execute(f"DROP TRIGGER {name}")
    approval = xdoc["approvals"][0]["seq"]
    (body,) = con.execute("SELECT body FROM ledger_entries WHERE seq = ?", (approval,)).fetchone()
    con.execute("UPDATE ledger_entries SET body = ? WHERE seq = ?",
                (_flip_command_signature(bytes(body)), approval))
    con.commit()
    con.close()
    code, out = ledger("at", "--db", str(tampered), "--device", "dev-0", "--time",
                       str(v2.ts - 1))
    assert code == 1
    assert f"FAIL: model.approved seq {approval} (approver)" in out
    assert "signature of approver does not verify" in out


def _flip_command_signature(body: bytes) -> bytes:
    """The entry body with one bit of its command envelope's signature flipped."""
    doc = canonical_decode(body)
    payload = doc[-1] if isinstance(doc, list) else doc["payload"]
    envelope = canonical_decode(payload["command"])
    sig = bytearray(envelope["signatures"][0]["sig"])
    sig[0] ^= 0x01
    envelope["signatures"][0]["sig"] = bytes(sig)
    payload["command"] = canonical_encode(envelope)
    return canonical_encode(doc)
