"""The read-only fleet dashboard (`hub serve --web`, hub/web/).

A real hub on a real nats-server serves the dashboard from its own event loop. Its
ledger holds a real rollout (devices, a validated and approved model, `rollout.create`
through the signed operator API) and, appended through the hub's own writer, events
whose device ids, model names, card fields, metric names and reasons are hostile
(`<script>`, an `onerror` attribute, `</svg>`, quotes, a Jinja2 expression). Pages are
fetched over HTTP from the hub's uvicorn and parsed; where Debian's chromium is
installed the overview and a rollout page are loaded in headless Chromium, whose DOM
must show the progress that only the page's poll could have filled in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from html import unescape as html_unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import tests.fleet
from edge_agent import protocol as proto
from hub import cli as hub_cli
from hub import events as ev
from hub.home.config import HubConfig, init_home
from hub.service.app import HubService
from hub.web import data as web_data
from hub.web.access import COOKIE, check_exposure
from hub.web.app import DashboardServer, create_app
from ledger.merkle import verify_inclusion
from ledger.signing import SigningKey
from ledger.storage.store import NewEvent
from testkit.nats_server import EmbeddedNats
from tests.fleet import REPO_ROOT, Fleet

pytestmark = pytest.mark.timeout(180)

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
SVG = "</svg><script>alert(2)</script>"
QUOTE = "it's \"quoted\" & {{7*7}}"
HOSTILE = (SCRIPT, IMG, SVG, QUOTE)
TOKEN = "t0k3n-" + "a" * 26
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium")
                                         .exists() else None)


class Page(HTMLParser):
    """Tags with their attributes, and text by element id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.html = html
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.by_id: dict[str, str] = {}
        self._open: list[str | None] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append((tag, found))
        if tag not in ("meta", "link", "br", "input", "img"):
            self._open.append(found.get("id"))
            if found.get("id"):
                self.by_id.setdefault(str(found["id"]), "")

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("meta", "link", "br", "input", "img") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for name in self._open:
            if name:
                self.by_id[name] += data

    def attrs_of(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


def assert_inert(html: str) -> None:
    """No markup came from a hostile string: the only script is the page's own file, no
    element has an event handler, no <img>, and the raw strings are nowhere."""
    page = Page(html)
    assert all(a.get("src") == "/static/live.js" for a in page.attrs_of("script")), html
    assert not page.attrs_of("img")
    assert not [a for _, attrs in page.tags for a in attrs if a.startswith("on")]
    for raw in (SCRIPT, IMG, SVG, "<img", "</svg><"):
        assert raw not in html


# ---------------------------------------------------------------- a hub with a dashboard


@dataclasses.dataclass
class World:
    fleet: Fleet
    rollout: str  # a real rollout, created (not started)
    hostile_seq: int  # a ledger entry about the hostile device

    @property
    def url(self) -> str:
        assert self.fleet.hub.dashboard is not None
        return self.fleet.hub.dashboard.url

    async def get(self, path: str, **params: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            # httpx replaces a path's query with `params`, even an empty one.
            return await client.get(path, params=params or None)

    async def page(self, path: str, **params: Any) -> str:
        response = await self.get(path, **params)
        assert response.status_code == 200, (path, response.status_code, response.text[:500])
        return response.text


async def append(fleet: Fleet, events: list[NewEvent]) -> int:
    async with fleet.hub.writer.lock:
        return (await fleet.hub.writer.append(events))[-1].seq


async def signed_reports(fleet: Fleet, key: SigningKey) -> None:
    """dev-0's reports as the hub records them: one signed by the device's key, and one
    whose recorded version is not the one the device signed."""
    events = []
    for seq, claimed in ((1, "1"), (2, "2")):
        report = proto.StatusReport(
            device="dev-0", boot="boot-1", seq=seq, ts=time.time_ns(),
            event=proto.STATUS_APPLIED, model="kws", version="1", digest="ab" * 32,
            counter=seq, reason="")
        events.append(NewEvent(ev.DEVICE_UPDATE_APPLIED, "dev-0", ev.device_subject("dev-0"), {
            "device": "dev-0", "model": "kws", "version": claimed, "digest": "ab" * 32,
            "counter": seq, "boot": "boot-1", "report_seq": seq,
            "report": proto.encode_signed_report(report, key)}))
    await append(fleet, events)


async def hostile_events(fleet: Fleet) -> int:
    """Devices, a model, its validation and a rollout with hostile strings everywhere,
    through the hub's writer (the operator API refuses such names; the ledger and the
    dashboard must still cope with whatever an old or foreign ledger holds)."""
    public = SigningKey.generate().public.raw
    model = {"name": IMG, "version": SCRIPT}
    subject = ev.model_subject(IMG, SCRIPT)
    events = [NewEvent(ev.DEVICE_ENROLLED, "test", ev.device_subject(d),
                       {"device": d, "public": public}) for d in (SCRIPT, IMG)]
    events += [NewEvent(ev.DEVICE_TAGGED, "test", ev.device_subject(SCRIPT),
                        {"device": SCRIPT, "group": IMG, "tags": {"site": SVG}})]
    events += [
        NewEvent(ev.MODEL_REGISTERED, "test", subject, {
            **model, "digest": "ab" * 32, "size": 10, "lineage": {"parent": SCRIPT},
            "card": {"intended_use": SVG, "limits": QUOTE}}),
        NewEvent(ev.MODEL_VALIDATED, "test", subject, {
            **model, "passed": True, "failures": [], "policy": {"min_accuracy": 0.5},
            "metrics": {"accuracy": 0.9, SVG: 0.5}}),
        NewEvent(ev.ROLLOUT_CREATED, "test", ev.rollout_subject(IMG), {
            "rollout": IMG, **{"model": IMG, "version": SCRIPT}, "digest": "ab" * 32,
            "manifest_hash": "cd" * 32, "target": QUOTE, "waves": ["1", "100%"],
            "policy": {"max_error_rate": 0.05, "max_p95_ms": 50.0, "max_psi": 0.2},
            "devices": [SCRIPT, IMG], "wave_sizes": [1, 1]}),
        NewEvent(ev.ROLLOUT_STARTED, "test", ev.rollout_subject(IMG), {"rollout": IMG}),
        NewEvent(ev.ROLLOUT_WAVE_STARTED, "hub", ev.rollout_subject(IMG),
                 {"rollout": IMG, "wave": 0, "devices": [SCRIPT]}),
        NewEvent(ev.ROLLOUT_WAVE_BAKING, "hub", ev.rollout_subject(IMG), {
            "rollout": IMG, "wave": 0,
            "evidence": {"error_rate": 0.01, "p95_ms": 12.5, "psi": 0.05}}),
        NewEvent(ev.ROLLOUT_WAVE_COMPLETED, "hub", ev.rollout_subject(IMG), {
            "rollout": IMG, "wave": 0,
            "evidence": {"error_rate": 0.01, "p95_ms": 12.5, "psi": 0.05, "devices": 1}}),
        NewEvent(ev.ROLLOUT_HALTED, "hub", ev.rollout_subject(IMG), {
            "rollout": IMG, "wave": 1, "reason": SVG,
            "evidence": {"error_rate": 0.2, "p95_ms": 80.0, "psi": 0.4}}),
        NewEvent(ev.DEVICE_UPDATE_FAILED, SCRIPT, ev.device_subject(SCRIPT), {
            "device": SCRIPT, **model, "digest": "ab" * 32, "counter": 1, "boot": QUOTE,
            "report_seq": 1, "reason": SVG}),
    ]
    return await append(fleet, events)


@pytest.fixture
async def world(tmp_path: Path, nats_server: EmbeddedNats, model_files: dict[str, Path],
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    """A hub serving `--web 127.0.0.1:0`, six devices in group lab, kws/1 released, a
    rollout of it created, and the hostile events."""
    def with_web(config: HubConfig) -> HubService:
        return HubService(dataclasses.replace(config, web_listen="127.0.0.1:0"))

    monkeypatch.setattr(tests.fleet, "HubService", with_web)
    fleet = await Fleet(tmp_path, nats_server.url).start()
    try:
        device_key = SigningKey.generate()
        public = device_key.public.raw
        devices = [f"dev-{i}" for i in range(6)]
        await append(fleet, [NewEvent(ev.DEVICE_ENROLLED, "test", ev.device_subject(d),
                                      {"device": d, "public": public}) for d in devices]
                     + [NewEvent(ev.DEVICE_TAGGED, "test", ev.device_subject(d),
                                 {"device": d, "group": "lab", "tags": {}}) for d in devices])
        await fleet.release_model(model_files["1"], "kws", "1")
        async with await fleet.client() as admin:
            created = await admin.call("rollout.create", {
                "model": "kws", "version": "1", "target": "group=lab", "waves": "50%,100%",
                "min_success": 1.0, "max_failure": 0.0, "deadline": "60s"})
        await signed_reports(fleet, device_key)
        seq = await hostile_events(fleet)
        yield World(fleet, str(created["rollout"]), seq)
    finally:
        await fleet.stop()


async def hub_cli_json(fleet: Fleet, *args: str) -> Any:
    """`hub ARGS --json --home HOME` in a child process (the in-process hub keeps
    serving meanwhile)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="300")
    env.pop("FLEET_HUB_HOME", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", *args, "--json", "--home", str(fleet.config.home),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


# ---------------------------------------------------------------- pages


async def test_every_page_renders_hostile_strings_inert(world: World) -> None:
    pages: list[tuple[str, dict[str, str]]] = [
        ("/", {}), ("/devices", {}), ("/devices", {"state": "failed"}),
        ("/device", {"id": SCRIPT}), ("/device", {"id": IMG}),
        ("/models", {}), ("/model", {"name": IMG, "version": SCRIPT}),
        ("/rollout", {"id": IMG}), ("/rollout", {"id": world.rollout}), ("/ledger", {}),
        ("/ledger", {"subject": "device:*"}), ("/entry", {"seq": str(world.hostile_seq)}),
    ]
    for path, params in pages:
        html = await world.page(path, **params)
        assert_inert(html)
    # Shown, as text: the device page names the device and its reason, escaped.
    device = await world.page("/device", id=SCRIPT)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in device
    assert "&lt;/svg&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in device
    assert Page(device).by_id["device-id"] == SCRIPT
    # Signed reports: checked against the enrolled key, as `hub device history` does.
    signatures = [a.get("class") for a in Page(await world.page("/device", id="dev-0"))
                  .attrs_of("span") if "sig" in str(a.get("class"))]
    assert signatures == ["sig sig-invalid", "sig sig-valid"]  # newest first
    model = await world.page("/model", name=IMG, version=SCRIPT)
    assert Page(model).by_id["model-name"] == f"{IMG}/{SCRIPT}"
    assert "{{7*7}}" in Page(model).html.replace("&#34;", '"').replace("&#39;", "'") \
        and ">49<" not in model  # a Jinja2 expression in a card is text
    # The hostile rollout's gate charts: three SVG charts with the limit lines.
    rollout = Page(await world.page("/rollout", id=IMG))
    assert len(rollout.attrs_of("svg")) == 4  # progress + error rate, p95, PSI
    assert any(a.get("class") == "limit" for a in rollout.attrs_of("line"))
    # JSON is JSON, whatever it holds.
    progress = (await world.get("/rollout/progress.json", id=IMG)).json()
    assert progress["rollout"] == IMG and progress["state"] == "halted"
    assert progress["reason"] == SVG
    # Unknown things are 404 pages, bad filters 400, neither echoing markup.
    for path, params, code in (("/device", {"id": SVG + "x"}, 404),
                               ("/rollout", {"id": SCRIPT}, 404),
                               ("/entry", {"seq": "999999"}, 404),
                               ("/ledger", {"from": SCRIPT}, 400),
                               ("/ledger", {"before": SCRIPT}, 400),
                               (f"/{SCRIPT}", {}, 404)):
        response = await world.get(path, **params)
        assert response.status_code == code, (path, response.status_code)
        assert_inert(response.text)


async def test_security_headers_and_no_secrets(world: World) -> None:
    response = await world.get("/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    html = response.text
    config = world.fleet.config
    secrets = [config.nats_auth(role).password or "" for role in ("hub", "operator")]
    secrets += [SigningKey.load(config.operator_key_path("admin")).private_raw().hex()]
    for path in ("/", "/ledger", "/device?id=dev-0", "/models"):
        html = await world.page(path)
        for secret in filter(None, secrets):
            assert secret not in html
        assert "password" not in html.lower()
    assert (await world.get("/healthz")).text == "ok\n"


async def test_numbers_equal_the_cli_json(world: World) -> None:
    status = await hub_cli_json(world.fleet, "status")
    overview = Page(await world.page("/"))
    shown = {a["data-state"]: None for a in overview.attrs_of("td") if a.get("data-state")}
    cells = re.findall(r'data-state="([^"]+)">(\d+)<', overview.html)
    assert dict((s, int(n)) for s, n in cells) == status["devices"]
    assert set(shown) == set(status["devices"])
    assert int(overview.by_id["device-total"]) == sum(status["devices"].values())
    cli = await hub_cli_json(world.fleet, "rollout", "status", world.rollout)
    progress = (await world.get("/rollout/progress.json", id=world.rollout)).json()
    assert [w["counts"] for w in progress["waves"]] == [w["counts"] for w in cli["waves"]]
    assert progress["state"] == cli["rollout"]["state"]
    page = await world.page("/rollout", id=world.rollout)
    for wave in cli["waves"]:
        # `--json` counts waves from 1 (docs/CLI-JSON.md); the page's rows keep the
        # hub's 0-based index in data-wave and show it 1-based.
        row = re.search(rf'<tr data-wave="{wave["wave"] - 1}">(.*?)</tr>', page, re.S)
        assert row is not None
        for field in ("devices", "applied", "failed", "pending"):
            assert f'data-field="{field}">{wave["counts"][field]}<' in row.group(1)


async def test_every_suggested_command_is_one_the_cli_accepts(world: World) -> None:
    """Each line a page offers to copy parses as a real `hub` or `ledger` command with
    real options (`--help` after them: click refuses an unknown option before it)."""
    from ledger.cli import app as ledger_app

    apps = {"hub": hub_cli.app, "ledger": ledger_app}
    lines = []
    for path, params in (("/", {}), ("/device", {"id": "dev-0"}), ("/models", {}),
                         ("/model", {"name": "kws", "version": "1"}),
                         ("/rollout", {"id": world.rollout}), ("/entry", {"seq": "3"})):
        html = await world.page(path, **params)
        for block in re.findall(r'<pre class="cmd"><code>(.*?)</code></pre>', html, re.S):
            lines += html_unescape(block).splitlines()
    assert len(lines) >= 9
    runner = CliRunner()
    for line in lines:
        tool, *words = shlex.split(line)
        result = runner.invoke(apps[tool], [*words, "--help"], prog_name=tool)
        assert result.exit_code == 0, (line, result.output)


async def test_the_ledger_explorer_filters_pages_and_proves_inclusion(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(web_data, "PAGE", 10)  # this ledger is a few pages long
    fleet = world.fleet
    assert fleet.hub.ledger_publishing is not None
    signed = await fleet.hub.ledger_publishing.checkpointer.sign_now()
    assert signed is not None
    # Filtered by kind and subject prefix, newest first, paged by `before`.
    page = Page(await world.page("/ledger", kind="device.enrolled"))
    seqs = [int(s) for s in re.findall(r'<a href="/entry\?seq=(\d+)">', page.html)]
    assert len(seqs) == 8 and seqs == sorted(seqs, reverse=True)
    # A time range: everything is from today, nothing from before 2001 or after 2100.
    assert "no entry matches" in await world.page("/ledger", to="2001-01-01")
    assert "no entry matches" in await world.page("/ledger", **{"from": "2100-01-01T00:00"})
    assert "no entry matches" not in await world.page(
        "/ledger", **{"from": "2001-01-01", "to": "2100-01-01 00:00:00"})
    by_prefix = await world.page("/ledger", kind="device.*", subject="device:dev-*")
    assert "device:dev-0" in by_prefix and "device:&lt;script" not in by_prefix
    first = await world.page("/ledger")
    older = re.search(r'href="\?before=(\d+)"', first)
    assert older is not None
    second = await world.page("/ledger", before=older.group(1))
    assert f'<a href="/entry?seq={int(older.group(1)) - 1}">' in second
    # The inclusion proof on the entry page checks with the ledger's own verifier.
    seq = world.hostile_seq
    entry = Page(await world.page("/entry", seq=str(seq)))
    assert entry.by_id["proof-verdict"] == "verified"
    store = fleet.hub.store
    size = int(entry.by_id["proof-size"])
    path = [bytes.fromhex(h) for h in re.findall(r"<li><code class=\"hash\">([0-9a-f]+)<",
                                                   entry.html)]
    found = store.get(seq)
    assert found is not None
    leaf = store.tree_hash.leaf(found.body)
    assert entry.by_id["proof-leaf"] == leaf.hex()
    root = bytes.fromhex(entry.by_id["proof-root"])
    assert size == signed.size and root == signed.root
    verify_inclusion(store.tree_hash, seq, size, leaf, path, root)
    assert entry.by_id["checkpoint-note"].startswith(fleet.config.origin)


# ---------------------------------------------------------------- access


def hub_app(tmp_path: Path, token: str | None) -> Any:
    config = init_home(tmp_path / "home", "nats://127.0.0.1:1", "ledger.db", False,
                       nats_auth=False)
    hub = HubService(config)
    return create_app(hub.dashboard_sources(), token), hub


async def test_a_token_is_needed_off_loopback_and_checked_on_every_request(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="token"):
        check_exposure("0.0.0.0", None)
    with pytest.raises(ValueError, match="at least"):
        check_exposure("0.0.0.0", "short")
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    with pytest.raises(ValueError):
        DashboardServer(create_app(hub_app(tmp_path / "a", None)[1].dashboard_sources()),
                        "192.0.2.1", 0, None)
    app, hub = hub_app(tmp_path, TOKEN)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
            for headers in ({}, {"Authorization": "Bearer wrong-" + TOKEN},
                            {"Authorization": "Bearer " + TOKEN[:-1]},
                            {"Cookie": f"{COOKIE}={TOKEN}"}):
                denied = await client.get("/", headers=headers)
                assert denied.status_code == 401
                assert TOKEN[:-1] not in denied.text and "wrong" not in denied.text
                assert denied.headers["x-content-type-options"] == "nosniff"
            wrong = await client.get("/ledger", params={"token": "x" + TOKEN})
            assert wrong.status_code == 401 and TOKEN not in wrong.text
            ok = await client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200 and TOKEN not in ok.text
            # The one-time link sets a cookie (not the token itself) and drops the token
            # from the address.
            link = await client.get("/ledger", params={"kind": "x", "token": TOKEN})
            assert link.status_code == 303
            assert link.headers["location"] == "/ledger?kind=x"
            cookie = link.headers["set-cookie"]
            assert TOKEN not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
            value = cookie.split(";")[0].split("=", 1)[1]
            with_cookie = await client.get("/", headers={"Cookie": f"{COOKIE}={value}"})
            assert with_cookie.status_code == 200
            assert (await client.get("/healthz")).status_code == 200  # for probes
    finally:
        hub.store.close()


async def test_without_a_token_only_loopback_host_names_are_answered(tmp_path: Path) -> None:
    """DNS rebinding: a page on evil.example that rebinds its name to 127.0.0.1 sends
    `Host: evil.example`; a loopback dashboard without a token does not answer it."""
    app, hub = hub_app(tmp_path, None)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://127.0.0.1:8080") as client:
            assert (await client.get("/")).status_code == 200
            assert (await client.get("/", headers={"Host": "localhost:8080"})).status_code \
                == 200
            evil = await client.get("/", headers={"Host": "evil.example:8080"})
            assert evil.status_code == 400
            assert "evil" not in evil.text
    finally:
        hub.store.close()


def test_hub_serve_refuses_an_open_address_without_a_token(tmp_path: Path) -> None:
    init_home(tmp_path / "home", "nats://127.0.0.1:1", "ledger.db", False, nats_auth=False)
    runner = CliRunner()
    for extra, words in (([], "token"), (["--web-token", "short"], "at least"),
                         (["--web-token", TOKEN, "--web-token-file", "x"], "use one")):
        result = runner.invoke(hub_cli.app, ["serve", "--home", str(tmp_path / "home"),
                                             "--web", "0.0.0.0:8080", *extra])
        assert result.exit_code == 2, result.output
        assert words in result.output
        assert TOKEN not in result.output
    result = runner.invoke(hub_cli.app, ["serve", "--home", str(tmp_path / "home"),
                                         "--web-token", TOKEN])
    assert result.exit_code == 2 and "--web" in result.output


# ---------------------------------------------------------------- in a browser


async def chromium_dom(url: str, profile: Path, budget_ms: int = 8000) -> str:
    """The DOM of `url` after headless Chromium loaded it and ran its scripts for
    `budget_ms` of virtual time."""
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    except TimeoutError:
        raise AssertionError("chromium did not finish within 90 s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def test_chromium_shows_live_progress_the_page_did_not_have(
    world: World, tmp_path: Path,
) -> None:
    """The rollout page is rendered while the rollout is `created`; the hub starts it
    (a signed `rollout.start`) before the page has fully reached the browser. The DOM
    Chromium ends with says `running`, with the controller's first wave: only the
    page's poll can have put that there."""
    fleet = world.fleet
    started = asyncio.Event()

    async def start_rollout() -> None:
        async with await fleet.client() as admin:
            await admin.call("rollout.start", {"rollout": world.rollout})
        started.set()

    app = create_app(fleet.hub.dashboard_sources())

    async def hooked(scope: Any, receive: Any, send: Any) -> None:
        async def send_after_start(message: Any) -> None:
            if (scope.get("path") == "/rollout" and message["type"] == "http.response.body"
                    and not message.get("more_body") and not started.is_set()):
                await start_rollout()  # the page is rendered; its last bytes wait
            await send(message)

        await app(scope, receive, send_after_start)

    server = DashboardServer(hooked, "127.0.0.1", 0, None)
    await server.start()
    task = asyncio.create_task(server.run())
    try:
        dom = Page(await chromium_dom(f"{server.url}rollout?id={world.rollout}",
                                      tmp_path / "profile"))
        assert started.is_set()
        live = next(a for t, a in dom.tags if a.get("id") == "live")
        assert live.get("data-source") == "poll", dom.html[:3000]
        assert int(str(live.get("data-polls"))) >= 1
        assert dom.by_id["rollout-state"] == "running"
        assert dom.by_id["rollout-wave"] == "1"
        assert dom.by_id["live-status"].startswith("updated ")
        # The overview, in the same browser: every section, nothing hostile came alive.
        overview = await chromium_dom(server.url, tmp_path / "profile2", 1000)
        assert_inert(overview)
        page = Page(overview)
        assert {"devices", "rollouts", "ledger-head", "tasks"} <= set(page.by_id)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop()


# ---------------------------------------------------------------- `hub serve --web`


def test_hub_serve_web_serves_the_dashboard_as_a_supervised_task(
    tmp_path: Path, bare_nats_server: EmbeddedNats,
) -> None:
    """`hub serve --web ADDR --web-token-file F` as a process: pages answer with the
    token, the overview lists the `dashboard` task as running, SIGTERM stops it all (exit
    0), and the token appears in no log line."""
    home = tmp_path / "home"
    init_home(home, bare_nats_server.url, "ledger.db", False, nats_auth=False)
    (tmp_path / "web.token").write_text(TOKEN + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("FLEET_HUB_HOME", None)
    # Port 0: the hub binds a free port itself and logs it (no pick-then-bind race with
    # parallel tests); the test reads it from the "dashboard on" line.
    with open(tmp_path / "hub.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "serve", "--home", str(home),
             "--web", "127.0.0.1:0", "--web-token-file", str(tmp_path / "web.token")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not (bound := re.search(r"dashboard on http://127\.0\.0\.1:(\d+)/",
                                      (tmp_path / "hub.log").read_text())):
            assert proc.poll() is None, (tmp_path / "hub.log").read_text()
            assert time.monotonic() < deadline, "the hub did not log its dashboard address"
            time.sleep(0.1)
        port = int(bound.group(1))
        url = f"http://127.0.0.1:{port}"
        while True:
            assert proc.poll() is None, (tmp_path / "hub.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the dashboard did not answer within 30 s"
            time.sleep(0.2)
        assert httpx.get(url, timeout=10).status_code == 401
        page = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert page.status_code == 200
        tasks = re.search(r'<section id="tasks">(.*?)</section>', page.text, re.S)
        assert tasks is not None and re.search(
            r"<td>dashboard</td><td><span class=\"state s-running\">", tasks.group(1))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise
    text = (tmp_path / "hub.log").read_text()
    assert code == 0, text
    assert f"dashboard on http://127.0.0.1:{port}/" in text
    assert TOKEN not in text


# ---------------------------------------------------------------- pure parts


def test_shown_values_hide_secrets_and_cut_bytes() -> None:
    assert web_data.redact("cannot connect to postgresql+psycopg://fleet:hunter2@db/x") == \
        "cannot connect to postgresql+psycopg://***@db/x"
    shown = web_data.shown({"device": "d", "password": "hunter2", "nested": {
        "private_key": b"k" * 32, "seed": "s"}, "blob": b"\x01" * 100, "short": b"\x02",
        "url": "nats://hub:pw@host:4222"})
    assert shown["password"] == "[hidden]"
    assert shown["nested"] == {"private_key": "[hidden]", "seed": "[hidden]"}
    assert shown["blob"].endswith("(100 bytes)") and shown["short"] == "02"
    assert shown["url"] == "nats://***@host:4222"


def test_telemetry_and_gate_charts_from_real_shaped_rows() -> None:
    from hub.web import charts

    rows = [{"device": "d", "model": "kws", "version": v, "digest": "ab", "counter": c,
             "windows": 3, "inferences": n, "errors": e, "p95_ms": p, "last_ts": c,
             "output_hist": [[1, 5, 9, 2], [3, 3]], "dropped": 0, "duplicates": 0}
            for v, c, n, e, p in (("1", 1, 400, 2, 3.5), (SCRIPT, 2, 0, 0, None))]
    drawn = charts.device_telemetry(rows)
    assert [c.title for c in drawn] == [
        "Inferences per release", "Error rate per release", "p95 latency per release",
        f"Output histogram of kws/{SCRIPT} (output 0)"]
    assert len(drawn[-1].rects) == 4
    waves = [{"wave": 0, "state": "done", "size": 2, "counts": {"devices": 2, "applied": 2},
              "evidence": {"error_rate": 0.01, "psi": 0.3}},
             {"wave": 1, "state": "pending", "size": 3, "counts": {}, "evidence": {}}]
    gates = charts.gates(waves, {"max_error_rate": 0.05, "max_psi": 0.25})
    assert [c.title for c in gates] == ["Gate evidence: error rate per wave",
                                        "Gate evidence: PSI per wave"]
    assert [r.css for r in gates[1].rects] == ["bad"]  # over its limit
    assert len(charts.wave_progress(waves).rects) == 2
