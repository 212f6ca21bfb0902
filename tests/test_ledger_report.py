"""`ledger report`: the self-contained HTML audit report.

Two ledgers: one written in-process whose operator, model, device and payload strings
are hostile (`<script>`, an `onerror` attribute, a Jinja2 expression), every command
and device report validly signed; and a real fleet (hub, agent, two operators) where
the report must agree with `ledger verify` and `ledger at`. The report is parsed with
html.parser, and, where Debian's chromium is installed, loaded from file:// in headless
Chromium to check the live DOM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ledger.cli import app
from ledger.encoding import canonical_encode
from ledger.signing import SigningKey
from ledger.storage.store import LedgerStore

pytestmark = pytest.mark.timeout(180)

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
JINJA = "{{7*7}}"
SECTIONS = ("verification", "operators", "models", "approvals", "validation", "releases",
            "rollouts", "devices", "appendix")
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium")
                                         .exists() else None)


def ledger(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


class Page(HTMLParser):
    """Tags, ids and text of an HTML document."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.html = html
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    @property
    def ids(self) -> set[str]:
        return {str(a["id"]) for _, a in self.tags if a.get("id")}

    @property
    def sections_text(self) -> str:
        return "".join(self.section(name) for name in SECTIONS)

    @property
    def all_text(self) -> str:
        return "".join(self.text)

    def section(self, name: str) -> str:
        """The text of <section id=name> (html.parser has no tree: re-parse the slice)."""
        raw = self.html
        start = raw.index(f'<section id="{name}">')
        return "".join(Page(raw[start:raw.index("</section>", start)]).text)


# ---------------------------------------------------------------- a hostile ledger


def _envelope(key: SigningKey, domain: str, doc: dict[str, Any]) -> bytes:
    signed = canonical_encode(doc)
    return canonical_encode({"signed": signed, "signatures": [
        {"keyid": key.keyid, "sig": key.sign(domain, signed)}]})


def hostile_ledger(path: Path) -> dict[str, int]:
    """A ledger whose names are attacker-chosen strings; returns the seqs by role."""
    admin, approver, device = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    name, version, dev = IMG, JINJA, SCRIPT
    seqs: dict[str, int] = {}
    with LedgerStore.open(path) as store:
        def add(role: str, kind: str, actor: str, subject: str, payload: dict[str, Any]) -> None:
            seqs[role] = store.append(kind, actor, subject, payload).seq

        def command(key: SigningKey, verb: str) -> bytes:
            return _envelope(key, "operator-command", {
                "actor": key.keyid, "verb": verb, "body": {"name": name, "version": version}})

        for role, key, who in (("admin", admin, "admin"), ("approver", approver, SCRIPT)):
            add(role, "operator.added", "hub", f"operator:{who}", {
                "name": who, "keyid": key.keyid, "public": key.public.raw,
                "roles": ["approver"]})
        subject = f"model:{name}/{version}"
        add("registered", "model.registered", admin.keyid, subject, {
            "name": name, "version": version, "digest": "ab" * 32,
            "lineage": {"parent": SCRIPT}, "card": {"intended_use": IMG},
            "command": command(admin, "model.register")})
        add("validated", "model.validated", admin.keyid, subject, {
            "name": name, "version": version, "passed": True, "failures": [],
            "metrics": {"accuracy": 0.93, SCRIPT: 1.0}, "policy": {"min_accuracy": 0.9},
            "approvals_required": 1, "command": command(admin, "model.validate")})
        add("approved", "model.approved", approver.keyid, subject, {
            "name": name, "version": version, "approvals": 1, "required": 1,
            "command": command(approver, "model.approve")})
        add("released", "model.released", admin.keyid, subject, {
            "name": name, "version": version, "digest": "ab" * 32,
            "manifest_hash": "cd" * 32, "expires": 0,
            "command": command(admin, "model.release")})
        rid = "r-9"
        add("rollout", "rollout.created", admin.keyid, f"rollout:{rid}", {
            "rollout": rid, "model": name, "version": version, "target": f"group={SCRIPT}",
            "waves": ["50%", "100%"], "wave_sizes": [1, 1], "devices": [dev, "dev-2"],
            "policy": {"min_success": 1.0, "max_failure": 0.0, "max_error_rate": 0.05,
                       "max_p95_ms": 50.0}})
        add("wave0", "rollout.wave_started", "hub", f"rollout:{rid}",
            {"rollout": rid, "wave": 0, "devices": [dev]})
        add("enrolled", "device.enrolled", admin.keyid, f"device:{dev}",
            {"device": dev, "public": device.public.raw})
        add("assigned", "device.assigned", "hub", f"device:{dev}", {
            "device": dev, "model": name, "version": version, "counter": 1,
            "deployment": IMG, "digest": "ab" * 32})
        report = {"device": dev, "model": name, "version": version, "digest": "ab" * 32,
                  "counter": 1, "event": "applied"}
        add("applied", "device.update_applied", device.keyid, f"device:{dev}", {
            **report, "boot": 1, "report_seq": 1,
            "report": _envelope(device, "device-report", report)})
        add("halted", "rollout.halted", "hub", f"rollout:{rid}", {
            "rollout": rid, "wave": 0, "reason": f"error rate too high {SCRIPT}",
            "evidence": {"devices": 1, "applied": 1, "failed": 0, "error_rate": 0.2,
                         "p95_ms": 12.5}, "auto_rollback": False})
    return seqs


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    db = tmp_path / "hostile.db"
    return db, hostile_ledger(db)


def test_the_report_shows_every_section_and_escapes_hostile_strings(
    hostile: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    db, seqs = hostile
    out = tmp_path / "report.html"
    code, said = ledger("report", "--db", str(db), "--out", str(out), "--device", SCRIPT)
    assert code == 0, said
    assert "PASS" in said
    html = out.read_text()
    page = Page(html)
    assert set(SECTIONS) <= page.ids
    # Self-contained: no script, no stylesheet or image to fetch, no URL at all.
    lowered = html.lower()
    for banned in ("<script", "<link", "<img", "http://", "https://", "@import", "url("):
        assert banned not in lowered, banned
    assert not [t for t, _ in page.tags if t in ("script", "img", "iframe", "object", "link")]
    assert not [a for _, a in page.tags if "src" in a]
    assert {str(a["href"])[:1] for _, a in page.tags if "href" in a} == {"#"}
    # The hostile strings are there, as text.
    text = page.all_text
    for hostile_text in (SCRIPT, IMG, JINJA):
        assert hostile_text in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "onerror" not in {k for _, attrs in page.tags for k in attrs}
    # The verdict, names and seqs.
    assert "PASS: the ledger verified" in text
    approvals = page.section("approvals")
    assert SCRIPT in approvals and f"seq\xa0{seqs['approved']}" in approvals
    assert "valid" in approvals and "INVALID" not in page.sections_text
    assert "accuracy" in page.section("validation") and "min_accuracy" in page.section(
        "validation")
    assert "cd" * 32 in page.section("releases")
    rollouts = page.section("rollouts")
    assert "r-9" in rollouts and f"seq\xa0{seqs['halted']}" in rollouts
    assert "Gate: error rate per wave" in rollouts and "limit 0.05" in rollouts
    devices = page.section("devices")
    assert f"Device {SCRIPT}" in devices and f"seq\xa0{seqs['applied']}" in devices
    assert f"{IMG}/{JINJA}" in devices
    appendix = page.section("appendix")
    for seq in seqs.values():
        assert f"seq-{seq}" in page.ids
    assert "ledger verify-bundle" in appendix
    assert sum(1 for t, _ in page.tags if t == "svg") >= 3


def test_a_tampered_ledger_gives_exit_1_and_a_fail_banner_naming_the_seq(
    hostile: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    db, seqs = hostile
    bad = seqs["approved"]
    con = sqlite3.connect(db)
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        con.execute(f"DROP TRIGGER {name}")
    (body,) = con.execute("SELECT body FROM ledger_entries WHERE seq = ?", (bad,)).fetchone()
    con.execute("UPDATE ledger_entries SET body = ? WHERE seq = ?",
                (bytes(body).replace(b"approvals", b"approvalz"), bad))
    con.commit()
    con.close()
    verify_code, verify_out = ledger("verify", "--db", str(db))
    out = tmp_path / "report.html"
    code, said = ledger("report", "--db", str(db), "--out", str(out))
    assert (verify_code, code) == (1, 1), said
    page = Page(out.read_text())
    banner = next(a for t, a in page.tags if a.get("id") == "verdict")
    assert "fail" in str(banner["class"])
    assert f"FAIL at seq {bad}" in page.all_text
    assert verify_out.strip().splitlines()[0] in page.section("verification")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    out = str(tmp_path / "r.html")
    assert ledger("report", "--out", out, "--db", str(tmp_path / "none.db"))[0] == 2
    assert ledger("report", "--out", out, "--db", "x.db", "--export", "x.export")[0] == 2
    code, _ = ledger("report", "--out", out, "--db", "x.db", "--from", "2024-06-01",
                     "--to", "2024-05-01")
    assert code == 2
    assert not Path(out).exists()


# ---------------------------------------------------------------- headless Chromium


def chromium_dom(page: Path, profile: Path) -> str:
    """The DOM of `page` after Chromium loaded it (and ran whatever it would run)."""
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        dom, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("chromium did not finish within 90 s") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    return dom


def test_chromium_renders_the_report_and_runs_nothing_from_the_ledger(
    hostile: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    db, seqs = hostile
    out = tmp_path / "report.html"
    assert ledger("report", "--db", str(db), "--out", str(out), "--device", SCRIPT)[0] == 0
    dom = chromium_dom(out, tmp_path / "chromium-profile")
    page = Page(dom)
    assert set(SECTIONS) <= page.ids
    # No live element came from a hostile string: the browser built none.
    assert not [t for t, _ in page.tags if t in ("script", "img", "iframe")]
    assert "onerror" not in {k for _, attrs in page.tags for k in attrs}
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    # The template expression is shown as written, never evaluated (not "49": a time of
    # day such as 04:44:49 may contain that).
    assert SCRIPT in page.all_text and JINJA in page.all_text
    assert JINJA in page.section("devices")
    assert "PASS: the ledger verified" in page.all_text
    assert f"seq-{seqs['applied']}" in page.ids


# ---------------------------------------------------------------- a real fleet


async def test_the_report_of_a_real_fleet_agrees_with_verify_and_at(
    fleet: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    from hub import events as ev

    async with await fleet.client() as client:
        await fleet.release_model(model_files["1"], "kws", "1")
        await client.call("device.enroll", {"device": "dev-0"})
        fleet.agent("dev-0").start()
        await client.call("deploy", {"model": "kws", "version": "1", "devices": ["dev-0"]})
        await fleet.feed.wait_for(
            lambda _: bool(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, "dev-0")), 60,
            "kws/1 applied")
        # kws/2 goes out in a rollout (one wave) to group `lab`.
        await client.call("device.tag", {"device": "dev-0", "group": "lab", "tags": {}})
        await fleet.release_model(model_files["2"], "kws", "2")
        rid = str((await client.call("rollout.create", {
            "model": "kws", "version": "2", "target": "group=lab", "waves": "100%",
            "min_success": 1.0, "max_failure": 0.0, "deadline": "60s"}))["rollout"])
        await client.call("rollout.start", {"rollout": rid})
        done = await fleet.feed.wait_for(lambda es: any(
            e.kind == "rollout.completed" for e in es), 90, "the rollout completed")
    await fleet.hub.ledger_publishing.checkpointer.sign_now()
    db = fleet.config.database_url()
    vkey = str(fleet.config.home / "log.vkey")

    verify_code, verify_out = ledger("verify", "--db", db, "--log-key", vkey, "--json")
    verified = json.loads(verify_out)
    at_code, at_out = ledger("at", "--db", db, "--device", "dev-0", "--time", "now", "--json")
    answer = json.loads(at_out)
    assert (verify_code, at_code) == (0, 0), (verify_out, at_out)

    out = tmp_path / "fleet.html"
    code, said = ledger("report", "--db", db, "--log-key", vkey, "--out", str(out),
                        "--device", "dev-0")
    assert code == 0, said
    page = Page(out.read_text())
    text = page.all_text
    assert f"PASS: the ledger verified ({verified['entries']} entries)" in text
    assert verified["head_hash"] in page.section("verification")
    assert verified["merkle_root"] in page.section("verification")
    approvals = page.section("approvals")
    assert "approver" in approvals
    assert [f"seq\xa0{a['seq']}" in approvals for a in answer["approvals"]] == [True]
    assert "valid" in approvals and "INVALID" not in page.sections_text
    assert answer["manifest_hash"] in page.section("releases")
    devices = page.section("devices")
    assert "Device dev-0" in devices and "kws/1" in devices and "kws/2" in devices
    rollouts = page.section("rollouts")
    decided = [e for e in done if e.subject == f"rollout:{rid}"]
    assert f"Rollout {rid}: kws/2" in rollouts and "(completed)" in rollouts
    assert {"rollout.created", "rollout.wave_started", "rollout.completed"} <= {
        e.kind for e in decided}
    for e in decided:
        assert f"seq\xa0{e.seq}" in rollouts, e.kind
    assert "created by admin" in rollouts and "Devices per wave" in rollouts
    assert f"seq\xa0{answer['applied']['seq']}" in devices
    assert "approved by approver" in " ".join(devices.split())
    for key in ("applied", "registered", "validated", "released"):
        assert f"seq-{answer[key]['seq']}" in page.ids


def test_the_report_of_an_export_file_matches_the_database_s(
    hostile: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    db, _ = hostile
    export = tmp_path / "ledger.export"
    assert ledger("export", "--db", str(db), str(export))[0] == 0
    from_db, from_export = tmp_path / "db.html", tmp_path / "export.html"
    # One end of the device window for both (by default each ends at its own "now", and
    # the two can be a second apart).
    end = str(time.time_ns())
    assert ledger("report", "--db", str(db), "--out", str(from_db), "--device", SCRIPT,
                  "--to", end)[0] == 0
    code, said = ledger("report", "--export", str(export), "--out", str(from_export),
                        "--device", SCRIPT, "--to", end)
    assert code == 0, said
    a, b = Page(from_db.read_text()), Page(from_export.read_text())
    assert a.ids == b.ids and set(SECTIONS) <= b.ids
    for name in ("operators", "models", "approvals", "rollouts", "devices", "appendix"):
        assert a.section(name) == b.section(name), name
