"""The dashboard's ASGI app (Starlette) and its server (uvicorn in the hub's own event
loop, a task under the hub's supervisor).

Read-only: every route is a GET that renders one page of hub.web.data; the one live
part, a rollout's progress, is polled as JSON by static/live.js. Templates are Jinja2
with autoescaping on for every file, and no value is ever used as template source.
Writes stay in the CLI (signed by an operator's key): pages show the `hub ...` command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import uvicorn
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from hub.web import charts, data
from hub.web.access import ASGIApp, TokenGate, check_exposure
from hub.web.data import BadQuery, DashboardSources, NotFound

log = logging.getLogger("hub.web")
HERE = Path(__file__).resolve().parent


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader([
            jinja2.PackageLoader("hub.web", "templates"),
            # The audit report's SVG chart macro, shared so both draw alike.
            jinja2.PrefixLoader({"report": jinja2.PackageLoader("ledger.report", "templates")}),
        ]),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True)
    env.globals["utc"] = data.utc
    # The commands a page suggests are shell-quoted: a copied line runs as shown even
    # when a name holds quotes or spaces.
    env.filters["shq"] = shlex.quote
    env.filters["with_param"] = lambda params, key, value: {**params, key: value}
    env.filters["rollout_command"] = lambda action, rid, home: (
        f"hub rollout {action} {shlex.quote(rid)}"
        + (" --reason '...'" if action in ("pause", "abort", "rollback") else "")
        + f" --home {shlex.quote(home)}")
    env.filters["query"] = lambda params: urlencode(
        {k: v for k, v in params.items() if v is not None and v != ""})
    return env


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise BadQuery(f"{name} must be a whole number")
    return int(raw)


# Without a token the dashboard answers only requests addressed to loopback by name: a
# web page elsewhere cannot rebind its own host name to 127.0.0.1 and read the fleet
# through the visitor's browser (DNS rebinding). With a token, the token decides.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def create_app(src: DashboardSources, token: str | None = None) -> ASGIApp:
    """The dashboard over `src`; with `token`, every request but /healthz needs it."""
    env = _environment()
    home = str(src.home)

    def page(template: str, **values: Any) -> HTMLResponse:
        html = env.get_template(template).render(home=home, **values)
        return HTMLResponse(html)

    async def overview(request: Request) -> Response:
        view = data.overview(src)
        chart = charts.by_count("Devices by model version they run", [
            (f"{m}/{v}", n) for m, v, n in view["by_version"]])
        states = charts.by_count("Devices by state", sorted(
            (view["status"].get("devices") or {}).items()))
        return page("overview.html.j2", nav="overview", charts=[c for c in (states, chart) if c],
                    **view)

    async def devices(request: Request) -> Response:
        state = request.query_params.get("state") or None
        view = data.devices(src, state, _int(request, "offset", 0) or 0)
        return page("devices.html.j2", nav="devices", **view)

    async def device(request: Request) -> Response:
        device_id = request.query_params.get("id", "")
        view = data.device(src, device_id, _int(request, "before"))
        return page("device.html.j2", nav="devices", device_id=device_id,
                    charts=charts.device_telemetry(view["telemetry_rows"]), **view)

    async def rollout(request: Request) -> Response:
        rid = request.query_params.get("id", "")
        view = data.rollout(src, rid, _int(request, "before"), _int(request, "offset", 0) or 0)
        waves = view["progress"]["waves"]
        return page("rollout.html.j2", nav="overview", rid=rid,
                    progress_chart=charts.wave_progress(waves) if waves else None,
                    gate_charts=charts.gates(waves, view["rollout"]["policy"]), **view)

    async def progress(request: Request) -> Response:
        return JSONResponse(data.progress(src, request.query_params.get("id", "")))

    async def models(request: Request) -> Response:
        return page("models.html.j2", nav="models", **data.models(src))

    async def model(request: Request) -> Response:
        name = request.query_params.get("name", "")
        version = request.query_params.get("version", "")
        view = data.model(src, name, version)
        chart = charts.values("Validation numbers", view["metrics"])
        return page("model.html.j2", nav="models", name=name, version=version,
                    metrics_chart=chart, **view)

    async def ledger(request: Request) -> Response:
        q = request.query_params
        flt = data.LedgerFilter(kind=q.get("kind", ""), subject=q.get("subject", ""),
                                actor=q.get("actor", ""), since=q.get("from", ""),
                                until=q.get("to", ""))
        view = data.ledger(src, flt, _int(request, "before"))
        return page("ledger.html.j2", nav="ledger", filter=flt, **view)

    async def entry(request: Request) -> Response:
        seq = _int(request, "seq")
        if seq is None:
            raise BadQuery("seq is required")
        return page("entry.html.j2", nav="ledger", entry=data.entry(src, seq))

    async def healthz(request: Request) -> Response:
        try:
            with src.store.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:
            return PlainTextResponse("database unreachable\n", status_code=503)
        return PlainTextResponse("ok\n")

    async def not_found(request: Request, exc: Exception) -> Response:
        message = str(exc) if isinstance(exc, NotFound) else "no such page"
        return HTMLResponse(env.get_template("error.html.j2").render(
            home=home, nav="", title="Not found", message=message), status_code=404)

    async def bad_query(request: Request, exc: Exception) -> Response:
        return HTMLResponse(env.get_template("error.html.j2").render(
            home=home, nav="", title="Bad request", message=str(exc)), status_code=400)

    app = Starlette(routes=[
        Route("/", overview), Route("/devices", devices), Route("/device", device),
        Route("/rollout", rollout), Route("/rollout/progress.json", progress),
        Route("/models", models), Route("/model", model), Route("/ledger", ledger),
        Route("/entry", entry), Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ], exception_handlers={NotFound: not_found, 404: not_found, BadQuery: bad_query},
       middleware=[] if token is not None else [
           Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS))])
    return TokenGate(app, token)


class DashboardServer:
    """uvicorn serving the dashboard in the running event loop. The socket is bound by
    `start()`, so a port in use fails the hub's start (not later, in a task); `run()`
    serves until cancelled, under the supervisor; uvicorn's own signal handling is not
    used (the hub's SIGTERM handler stays in charge)."""

    def __init__(self, app: ASGIApp, host: str, port: int, token: str | None) -> None:
        check_exposure(host, token)  # `app` must be create_app(..., token)
        self.app = app
        self.host = host
        self.port = port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/"

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        sock.setblocking(False)
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        # log_config=None: uvicorn's records go through the hub's own handlers (its
        # --log-format), not a dictConfig of uvicorn's own.
        config = uvicorn.Config(self.app, lifespan="off", log_config=None,
                                log_level="warning", access_log=False, server_header=False,
                                timeout_graceful_shutdown=2)
        config.load()
        server = uvicorn.Server(config)
        # What uvicorn's own serve() does before startup(), minus its signal handlers.
        server.lifespan = config.lifespan_class(config)
        self._server = server
        await server.startup(sockets=[sock])
        log.info("dashboard on %s", self.url)
        return self.port

    async def run(self) -> None:
        if self._server is None or self._socket is None or self._socket.fileno() < 0:
            await self.start()
        assert self._server is not None
        self._server.should_exit = False
        await self._server.main_loop()

    async def stop(self) -> None:
        server, sock = self._server, self._socket
        if server is None or sock is None:
            return
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.shutdown(sockets=[sock]), 5)
        self._server = self._socket = None
