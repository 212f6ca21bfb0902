"""`hub init`, `hub serve`, `hub status`, `hub whoami`, `hub rebuild`: the hub itself.

`serve` and `rebuild` import the server modules inside the function, so the rest of the
CLI loads none of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from hub.cli._common import (
    EXIT_REFUSED,
    HOME,
    JSON,
    KEY,
    NATS_URL,
    TIMEOUT,
    WATCH,
    call,
    err,
    examples,
    hub_config,
    out,
    rfc3339,
    run,
    show,
    watch,
)
from hub.errors import EXIT_TASK_FAILED, Unreachable, UsageError
from hub.home.config import init_home, parse_listen
from ledger.logs import LOG_FORMAT_HELP, configure_logging

STOP_GRACE_S = 10.0  # `hub serve` after SIGTERM: the hub's own stop is bounded below this

commands = typer.Typer()


@commands.command(epilog=examples(
    'hub init hub-home --nats nats://127.0.0.1:4222',
    'hub init hub-home --tls',
    'hub init hub-home --database postgresql+psycopg://fleet@127.0.0.1/fleet',
    'hub init hub-home --origin example.com/fleet-log --tree-hash blake3',
    'hub init hub-home --offline-root /media/usb/root',
    'hub init hub-home --cluster 3    (nodes on 127.0.0.1:4222-4224, routes 6222-6224)',
    'hub init hub-home --cluster 3 --cluster-hosts 10.0.0.1,10.0.0.2,10.0.0.3',
))
def init(
    home: Path = typer.Argument(..., help="Directory to create (keys, trust root, config)."),
    nats_url: str = typer.Option("nats://127.0.0.1:4222", "--nats", help="NATS server URL."),
    database: str = typer.Option(
        "ledger.db", "--database", help="SQLite file (relative to DIR) or a database URL, "
        "e.g. postgresql+psycopg://user@127.0.0.1/fleet (the ledger and the hub's tables)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing home's keys."),
    tls: bool = typer.Option(False, "--tls", help="Also make a CA and a server certificate "
                             "for 127.0.0.1/localhost; server and clients then use TLS."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Write no NATS server "
                                 "configuration (a server without users; tests, benchmarks)."),
    origin: str | None = typer.Option(
        None, "--origin", help="The log's name in signed checkpoints and its key name, a "
        "schema-less URL such as example.com/fleet-log (default: fleetledger.local/ and a "
        "random id)."),
    tree_hash: str = typer.Option(
        "sha256", "--tree-hash", help="The ledger's Merkle tree hash: sha256 (RFC 6962, "
        "checked by standard C2SP/tlog tooling) or blake3. The chain hash and blob "
        "digests are BLAKE3 either way."),
    offline_root: Path | None = typer.Option(
        None, "--offline-root", metavar="DIR", help="Write the root key to DIR (not inside "
        "the home) instead of DIR/keys: the hub runs without it and trust root changes go "
        "through `hub keys root prepare`, `sign` (offline) and `import`."),
    cluster: int = typer.Option(
        0, "--cluster", min=0, metavar="N", help="Also write one nats-server configuration "
        "per node of an N-node cluster with JetStream (DIR/nats/node-1.conf ...); "
        "config.toml then lists every node's URL, and the hub's streams and buckets get "
        "3 replicas when N >= 3. On one host the ports count up from --nats, "
        "--cluster-port and --leaf-port."),
    cluster_hosts: str | None = typer.Option(
        None, "--cluster-hosts", metavar="H1,H2,...", help="One host per node (default: "
        "the host of --nats for all); on distinct hosts every node uses the same ports."),
    cluster_port: int = typer.Option(6222, "--cluster-port", help="The first node's "
                                     "route port (--cluster)."),
    leaf_port: int = typer.Option(7422, "--leaf-port", help="The first node's port for edge "
                                  "sites' leaf nodes (--cluster; `hub site add`)."),
) -> None:
    """Create a hub home: Ed25519 keys for the root, release, director and log roles, the
    signed trust root that devices pin (DIR/trust-root.bin), the first operator's key
    (DIR/operators/admin.key), a validation policy (DIR/policy.toml) and DIR/config.toml."""
    if offline_root is not None:
        from hub.keys.keyring import check_outside_home

        check_outside_home(home, offline_root)  # before any key is written
    hosts = [h.strip() for h in cluster_hosts.split(",")] if cluster_hosts else None
    if hosts is not None and not cluster:
        raise UsageError("--cluster-hosts needs --cluster N")
    config = init_home(home, nats_url, database, force, nats_auth=not no_auth, tls=tls,
                       origin=origin, tree_hash=tree_hash, cluster=cluster,
                       cluster_hosts=hosts, cluster_port=cluster_port, leaf_port=leaf_port)
    out.print(f"hub home ready in [bold]{home}[/bold]")
    out.print(f"  trust root for devices: {config.trust_root_path}")
    out.print(f"  log verifier key (for `ledger witness` / `ledger verify --log-key`): "
              f"{config.home / 'log.vkey'}")
    if offline_root is not None:
        from hub.keys.keyring import Keyring

        for path in Keyring(config).move_root_keys(offline_root):
            out.print(f"  root key, OFFLINE (not in the home; keep it off the network): "
                      f"{path}, with a copy of trust root 1 beside it")
    out.print(f"  first operator key (admin): {config.operator_key_path('admin')}")
    out.print(f"  validation policy: {config.policy_path}")
    out.print(f"  ledger: {config.database_url()} (Merkle tree hash {tree_hash}, log "
              f"origin {escape(config.origin)})")
    if not no_auth:
        out.print(f"  nats-server config (users, permissions{', TLS' if tls else ''}): "
                  f"{home / 'nats' / 'nats-server.conf'}; run nats-server -js -c with it")
    if cluster:
        out.print(f"  cluster of {cluster}: {home / 'nats'}/node-1.conf ... node-{cluster}.conf "
                  f"(run one nats-server -c per node instead); nats_url {config.nats_url}; "
                  f"stream replicas {config.nats_replicas}")
    out.print(f"next: hub serve --home {home}")


@commands.command(epilog=examples(
    'hub serve --home hub-home',
    'hub serve --home hub-home --metrics 0.0.0.0:9464 --log-level DEBUG',
    'hub serve --home hub-home --metrics-port 9464    (= --metrics 127.0.0.1:9464)',
    'hub serve --home hub-home --log-format json --wait-nats 60',
    'hub serve --home hub-home --web 127.0.0.1:8080    (the dashboard: http://127.0.0.1:8080/)',
    'hub serve --home hub-home --web 0.0.0.0:8080 --web-token-file hub-home/web.token',
))
def serve(
    home: Path = HOME,
    nats_url: str | None = NATS_URL,
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    metrics: str | None = typer.Option(
        None, "--metrics", metavar="ADDR:PORT",
        help="Serve Prometheus metrics on http://ADDR:PORT/metrics, e.g. 0.0.0.0:9464 "
             "(config.toml metrics_listen; default off)."),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port",
        help="The same as --metrics 127.0.0.1:PORT (config.toml metrics_port)."),
    wait_nats: float = typer.Option(
        10.0, "--wait-nats", min=0, help="Seconds to keep trying to reach the NATS server "
        "(exponential backoff, one log line per attempt) before giving up (exit 3); handy "
        "right after starting it."),
    log_format: str = typer.Option("auto", "--log-format", help=LOG_FORMAT_HELP),
    web: str | None = typer.Option(
        None, "--web", metavar="ADDR:PORT",
        help="Serve the read-only dashboard on http://ADDR:PORT/ (default off). An address "
             "other than loopback needs --web-token-file (or --web-token)."),
    web_token: str | None = typer.Option(
        None, "--web-token", metavar="TOKEN", help="The dashboard's access token (16+ "
        "characters); every request then needs it (Authorization: Bearer, or open "
        "/?token=TOKEN once for a cookie). Prefer --web-token-file: a command line is "
        "visible to other users of the machine."),
    web_token_file: Path | None = typer.Option(
        None, "--web-token-file", metavar="FILE",
        help="Read the dashboard's token from FILE (its first line)."),
) -> None:
    """Run the hub: create the NATS buckets and streams, answer signed operator commands,
    record device reports in the ledger, and drive rollouts. Stops cleanly on SIGTERM or
    Ctrl-C, at any point (also while still connecting): exit 0. Exit 3 when NATS cannot
    be reached (or refuses the hub) within --wait-nats, 4 when a critical task fails."""
    from hub.service.app import HubService
    from ledger.retry import Stopped

    try:
        configure_logging(log_level, log_format)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    config = hub_config(home, nats_url, server=True)
    if metrics is not None and metrics_port is not None:
        raise UsageError("--metrics and --metrics-port both give the listen address; use one")
    listen = metrics if metrics is not None else (
        None if metrics_port is None else f"127.0.0.1:{metrics_port}")
    if listen is not None:
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        config = dataclasses.replace(config, metrics_listen=listen)
    if web is not None or web_token is not None or web_token_file is not None:
        config = dataclasses.replace(config, **web_options(web, web_token, web_token_file))

    async def main() -> str:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # first: SIGTERM works from here on
            loop.add_signal_handler(sig, stop.set)
        service = HubService(config)
        starting = asyncio.create_task(service.start(stop=stop, connect_for=wait_nats))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # stopped half-way through the start
                starting.cancel()
            try:
                await starting
            except (Stopped, asyncio.CancelledError):
                logging.getLogger("hub").info("stopped before serving")
                return ""
            fatal = service.supervisor.fatal
            waits = [stopped, asyncio.create_task(fatal.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            return service.supervisor.fatal_reason if fatal.is_set() else ""
        finally:
            stopped.cancel()
            try:  # bounded: a NATS call that hangs must not keep the hub from exiting
                await asyncio.wait_for(service.stop(), STOP_GRACE_S)
            except Exception as exc:
                logging.getLogger("hub").warning("did not stop cleanly: %s", exc)

    try:
        fatal = asyncio.run(main())
    except OSError as exc:
        raise Unreachable(f"cannot reach NATS at {config.nats_url}: {exc}") from exc
    if fatal:  # a critical task cannot work: exit so a service manager restarts the hub
        err.print(f"[red]error:[/red] {escape(fatal)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_TASK_FAILED)


def web_options(web: str | None, token: str | None, token_file: Path | None
                ) -> dict[str, Any]:
    """`--web`, `--web-token`, `--web-token-file` checked: UsageError for a bad address,
    a missing or short token, or a non-loopback address without a token."""
    from hub.web.access import check_exposure

    if web is None:
        raise UsageError("--web-token and --web-token-file go with --web ADDR:PORT")
    if token is not None and token_file is not None:
        raise UsageError("--web-token and --web-token-file both give the token; use one")
    if token_file is not None:
        try:
            token = token_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise UsageError(f"cannot read a token from {token_file}: "
                             f"{getattr(exc, 'strerror', None) or 'empty file'}") from exc
    try:
        host, _ = parse_listen(web)
        check_exposure(host, token)
    except ValueError as exc:
        raise UsageError(f"--web: {exc}") from exc
    return {"web_listen": web, "web_token": token}


@commands.command(epilog=examples(
    'hub status --home hub-home',
    'hub status --home hub-home --wait 30    (until the hub answers)',
    'hub status --home hub-home --json',
    'hub status --home hub-home --watch 5',
))
def status(
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
    wait: float = typer.Option(
        0.0, "--wait", min=0, help="Retry for up to this many seconds while NATS or the hub "
        "is not up yet (exit 3 if it never answers); for scripts that just started them."),
    watch_s: float | None = WATCH,
) -> None:
    """The fleet at a glance, as the running hub sees it: devices by state, active
    rollouts, the ledger head, the last checkpoint's age and the witnesses that cosigned
    it, whether NATS and the database answer, refused reports, and the state of each
    background task. --json: the document of docs/CLI-JSON.md."""
    def render(result: dict[str, Any]) -> None:
        states = result.get("devices") or {}
        out.print(f"devices: {sum(states.values()):,}"
                  + (" (" + ", ".join(f"{n:,} {escape(s)}" for s, n in sorted(states.items()))
                     + ")" if states else ""), highlight=False)
        rollouts = result.get("rollouts") or []
        out.print(f"active rollouts: {len(rollouts)}"
                  + "".join(f"\n  {r['rollout']} {escape(r['model'])}/{escape(r['version'])}"
                            f" {r['state']} (wave {r['wave']}, target {escape(r['target'])})"
                            for r in rollouts), highlight=False)
        out.print(f"ledger: {result['entries']} entries, head {result['head'] or '-'}")
        cp = result.get("checkpoint")
        listed = result.get("witnesses") or []
        if cp is None:
            out.print("checkpoint: none signed yet")
        else:
            cosigned = ", ".join(map(escape, cp["witnesses"])) or "no witness"
            out.print(f"checkpoint: tree size {cp['size']}, signed {cp['age_s']:.0f}s ago, "
                      f"cosigned by {cosigned} ({len(listed)} witness(es) listed)",
                      highlight=False)
        reachable = {True: "[green]reachable[/green]", False: "[red]UNREACHABLE[/red]"}
        db, nats = result.get("database") or {}, result.get("nats") or {}
        if db or nats:
            out.print(f"NATS {reachable[bool(nats.get('reachable'))]}, database "
                      f"{reachable[bool(db.get('reachable'))]}"
                      + (f" ({escape(db['error'])})" if db.get("error") else ""))
        lead = result.get("leadership") or {}
        if lead:
            leader, this = lead.get("leader") or {}, lead.get("this") or {}
            out.print(("leader: " + (f"{escape(str(leader.get('host')))} pid {leader.get('pid')}"
                                     f" epoch {leader.get('epoch')}" if leader else "none"))
                      + f"; answered by pid {this.get('pid')} ({this.get('role')})"
                      + "".join(f"\n  {escape(str(p['host']))} pid {p['pid']}: {p['role']}"
                                for p in lead.get("processes") or []), highlight=False)
        intake = result.get("intake") or {}
        if intake:
            mine = intake.get("this_process") or {}
            out.print(f"telemetry windows counted: {intake['windows_total']:,} by every hub "
                      f"process, {mine.get('windows_counted', 0):,} by this one (pid "
                      f"{(lead.get('this') or {}).get('pid')})", highlight=False)
        reasons = result.get("refused_by_reason") or {}
        detail = ", ".join(f"{escape(str(k))} {v}" for k, v in sorted(reasons.items()))
        out.print(f"refused reports since start (this process): {result['refused_reports']}"
                  + (f" ({detail})" if detail else ""), highlight=False)
        tasks = result.get("tasks") or []
        if tasks:
            table = Table("task", "state", "restarts", "since", "last error")
            for t in tasks:
                color = {"running": "green", "failed": "red"}.get(t["state"], "yellow")
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["since"]))
                table.add_row(escape(t["name"]), f"[{color}]{t['state']}[/{color}]",
                              str(t["restarts"]), since, escape(t["last_error"] or "-"))
            out.print(table)
        replies = result.get("refused_replies") or {}
        if replies:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(replies.items()))
            out.print(f"requests dropped for their reply subject since start: {kinds}")
        uploads = result.get("refused_uploads") or {}
        if uploads:
            kinds = ", ".join(f"{escape(str(k))} {v}" for k, v in sorted(uploads.items()))
            out.print(f"uploads refused since start: {kinds}", highlight=False)

    config = hub_config(home, nats_url)
    if watch_s is not None:
        watch(config, key, timeout, watch_s, lambda c: c.call("status", {}),
              lambda r: show(status_document(r) if as_json else r, as_json, render), as_json)
        return
    deadline = time.monotonic() + wait
    while True:
        try:
            result = run(config, key, timeout, lambda c: c.call("status", {}))
            break
        except Unreachable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
    if as_json:
        result = status_document(result)
    show(result, as_json, render)


def status_document(result: dict[str, Any]) -> dict[str, Any]:
    """`hub status --json` (docs/CLI-JSON.md): RFC 3339 times, null (not "" or 0) for no
    error, no holder and a rollout not started; the rest as the hub said."""
    cp = result.get("checkpoint")
    tasks = [{**t, "since": rfc3339(int(t["since"] * 1e9)),
              "last_error": t.get("last_error") or None,
              "last_error_at": rfc3339(int(t.get("last_error_at", 0) * 1e9))}
             for t in result.get("tasks") or []]
    lead = result.get("leadership")
    if isinstance(lead, dict):
        lead = {**lead, **{k: {**lead[k], "holder": lead[k].get("holder") or None}
                           for k in ("leader", "this") if isinstance(lead.get(k), dict)}}
    return {**result, "tasks": tasks, "leadership": lead,
            # The hub counts waves from 1 here already, 0 for "not started": null.
            "rollouts": [{**r, "wave": r["wave"] or None} for r in result.get("rollouts") or []],
            "checkpoint": None if cp is None else {
                "size": cp["size"], "time": rfc3339(cp["ts"]), "age_s": cp["age_s"],
                "witnesses": cp["witnesses"]}}


@commands.command(epilog=examples(
    'hub whoami --home hub-home',
    'hub whoami --home hub-home --key hub-home/operators/alice.key',
))
def whoami(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
           as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """Show which operator your key is and its roles, as the hub knows them."""
    show(call(hub_config(home, nats_url), key, timeout, "whoami"), as_json,
         lambda r: out.print(f"{r['name']} (key {r['keyid']}): {', '.join(r['roles'])}"))


@commands.command(epilog=examples(
    'hub rebuild --home hub-home',
    'hub rebuild --home hub-home --in-place    (with the hub stopped)',
))
def rebuild(
    home: Path = HOME,
    in_place: bool = typer.Option(
        False, "--in-place", help="Replace the live projection tables (stop the hub first)."
    ),
    as_json: bool = JSON,
) -> None:
    """Replay the ledger into empty tables and compare the state digest with the live one.
    Exit 0 when they are equal, 1 when they differ (the live state is not a fold of the
    ledger)."""
    from hub.rebuild import live_digest, rebuild_digest, rebuild_in_place
    from ledger.errors import LedgerError
    from ledger.storage.store import LedgerStore

    config = hub_config(home, None, server=True)
    try:
        store = LedgerStore.open(config.database_url(), create=False)
    except LedgerError as exc:
        raise UsageError(str(exc)) from exc
    with store:
        live = live_digest(store)
        rebuilt, count = rebuild_digest(store)
        if in_place:
            rebuild_in_place(store)
            live = live_digest(store)

    def render(_: dict[str, Any]) -> None:
        mark = "[green]equal[/green]" if live == rebuilt else "[red]DIFFERENT[/red]"
        out.print(f"replayed {count} entries; state digest live {live[:16]}…, "
                  f"rebuilt {rebuilt[:16]}…: {mark}")

    show({"entries": count, "live": live, "rebuilt": rebuilt, "equal": live == rebuilt},
         as_json, render)
    if live != rebuilt:
        raise typer.Exit(EXIT_REFUSED)
