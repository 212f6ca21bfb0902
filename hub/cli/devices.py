"""`hub device enroll|revoke|show|history`, `hub devices` and `hub deploy`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from edge_agent.protocol import ProtocolError, StatusReport, read_report
from hub.cli._common import (
    EXIT_REFUSED,
    HOME,
    JSON,
    KEY,
    NATS_URL,
    TIMEOUT,
    WATCH,
    ago,
    call,
    err,
    examples,
    hub_config,
    key_column,
    out,
    resolve_ref,
    rfc3339,
    run,
    show,
    utc_time,
    watch,
)
from hub.client import HubClient
from hub.errors import UsageError

commands = typer.Typer()  # top-level: `hub devices`, `hub deploy`
device_commands = typer.Typer()  # under `hub device`


@device_commands.command("enroll", epilog=examples(
    'hub device enroll dev-1 --home hub-home',
    'edge-agent run --bundle hub-home/devices/dev-1 --state-dir state/dev-1',
))
def device_enroll(
    device_id: str = typer.Argument(..., help="Device id: letters, digits, '-' or '_'."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Enroll a device so it can be deployed to. The hub makes the device's own key (it
    signs the device's status reports) and writes a device bundle, HOME/devices/ID/
    (device.toml, device.key, trust-root.bin): copy it to the device."""
    def render(result: dict[str, Any]) -> None:
        out.print(f"enrolled {device_id} (ledger seq {result['seq'][0]}, device key "
                  f"{result['keyid']}); bundle in {result['bundle']}; start it with:")
        out.print(f"  edge-agent run --bundle {result['bundle']} --state-dir STATE",
                  soft_wrap=True)

    show(call(hub_config(home, nats_url), key, timeout, "device.enroll",
              {"device": device_id}), as_json, render)


@device_commands.command("revoke", epilog=examples(
    "hub device revoke dev-1 --reason 'lost in transit' --home hub-home",
))
def device_revoke(
    device_id: str = typer.Argument(..., help="The enrolled device to shut out."),
    reason: str = typer.Option("", "--reason", help="Why (kept in the ledger)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Shut a device out: the hub records `device.revoked`, removes the device's user from
    the NATS server's users file and reloads the server (its connection is closed and it
    cannot connect again), and refuses any report still arriving from it."""
    def render(result: dict[str, Any]) -> None:
        note = "" if result.get("reloaded") else (
            "; the NATS server is not local: reload it (nats-server --signal reload) to apply")
        out.print(f"revoked {device_id} (ledger seq {result['seq'][0]}){note}")

    show(call(hub_config(home, nats_url), key, timeout, "device.revoke",
              {"device": device_id, "reason": reason}), as_json, render)


token_commands = typer.Typer(  # `hub device token` (hub/cli/__init__.py)
    no_args_is_help=True,
    help="One-time enrolment tokens: a device makes its own key and enrols with one "
    "(`edge-agent keygen`, `edge-agent enroll`); the private key never leaves it.",
    epilog=examples("hub device token create dev-7 --ttl 1h --home hub-home"))

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """Seconds from `90`, `90s`, `15m`, `1h` or `2d`."""
    unit = text[-1:] if text[-1:] in _TTL_UNITS else "s"
    number = text[:-1] if text[-1:] in _TTL_UNITS else text
    try:
        seconds = int(number) * _TTL_UNITS[unit]
    except ValueError:
        raise UsageError(f"--ttl {text!r}: expected a whole number with s, m, h or d "
                         "(e.g. 1h)") from None
    if seconds < 1:
        raise UsageError(f"--ttl {text!r}: must be at least 1 s")
    return seconds


@token_commands.command("create", epilog=examples(
    "hub device token create dev-7 --home hub-home",
    "hub device token create dev-7 --ttl 15m --json --home hub-home",
))
def token_create(
    device_id: str = typer.Argument(..., help="The device id the token enrols (once)."),
    ttl: str = typer.Option("1h", "--ttl", help="How long the token is valid: 90s, 15m, 1h, "
                            "2d (at most 30d)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Make a one-time enrolment token for a device that makes its own key. The hub
    records `device.token_created` with the token's hash only; the token itself is
    printed here once: hand it to the device (with the command below), which runs
    `edge-agent keygen` and `edge-agent enroll`. Refused if the device is enrolled."""
    seconds = parse_ttl(ttl)

    def render(result: dict[str, Any]) -> None:
        out.print(f"token for {device_id} (id {result['token_id']}, ledger seq "
                  f"{result['seq'][0]}), valid until {rfc3339(result['expires'])}, once:")
        out.print(f"  {result['token']}", soft_wrap=True)
        out.print("on the device:", soft_wrap=True)
        out.print("  edge-agent keygen --bundle BUNDLE", soft_wrap=True)
        out.print(f"  edge-agent enroll --bundle BUNDLE --device-id {device_id} --token "
                  f"{result['token']} --hub {result['enrol_url']}", soft_wrap=True,
                  markup=False)

    result = call(hub_config(home, nats_url), key, timeout, "device.token",
                  {"device": device_id, "ttl_s": seconds})
    # --json: RFC 3339 `expires` beside the hub's ns (docs/schemas/hub/device-token-create).
    view = {**result, "expires": rfc3339(result["expires"]), "expires_ts": result["expires"]}
    show(view, as_json, lambda _: render(result))


def device_view(result: dict[str, Any]) -> dict[str, Any]:
    """The `hub device show --json` document (docs/CLI-JSON.md): full digests, RFC 3339
    times, null for what is not known."""
    row, telemetry = result["device"], result["telemetry"]
    assigned = ({"model": row["assigned_model"], "version": row["assigned_version"],
                 "counter": row["counter"]} if row["assigned_model"] else None)
    running = ({"model": row["model"], "version": row["version"], "digest": row["digest"]}
               if row["model"] else None)
    return {
        "device": row["device"], "state": row["state"], "last_error": row["last_error"],
        "enrolled_seq": row["enrolled_seq"], "updated": rfc3339(row["updated_ts"]),
        "group": result["group"] or None, "tags": result["tags"],
        "assigned": assigned, "running": running,
        "trust_root_version": None,  # status reports do not carry it (yet)
        "rollout": result["rollout"],
        "telemetry": None if telemetry is None else {
            "last_seen": rfc3339(telemetry["last_seen"]), "boot": telemetry["boot"] or None,
            # The hub keeps -1 for "no window seq yet"; --json says null.
            "window_seq": telemetry["window_seq"] if telemetry["window_seq"] >= 0 else None,
            "inferences": telemetry["inferences"],
            "errors": telemetry["errors"], "latency_ms_p95": telemetry["latency_ms_p95"]},
        "reports": [{"seq": r["seq"], "time": rfc3339(r["ts"]), "event": r["kind"],
                     "model": r["model"], "version": r["version"], "digest": r["digest"],
                     "counter": r["counter"], "reason": r["reason"] or None}
                    for r in result["reports"]],
        "history": f"hub device history {row['device']}",
    }


@device_commands.command("show", epilog=examples(
    'hub device show dev-1 --home hub-home',
    'hub device show dev-1 --json --home hub-home',
))
def device_show(
    device_id: str = typer.Argument(..., help="Device id."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """One device: its state, the release it was assigned and the one it last reported
    running, the trust-root version it reported (devices do not report it yet: "not
    reported"), group and tags, the active rollout it is in, its last status reports and
    its telemetry (last window, totals). Every ledger event about it: `hub device
    history`. --json prints the document of docs/CLI-JSON.md."""
    view = device_view(call(hub_config(home, nats_url), key, timeout, "device.show",
                            {"device": device_id}))

    def render(v: dict[str, Any]) -> None:
        state = v["state"]
        color = {"applied": "green", "failed": "red", "reverted": "red",
                 "revoked": "red"}.get(state, "yellow")
        out.print(f"[bold]{escape(v['device'])}[/bold]  [{color}]{state}[/{color}]"
                  + (f": {escape(v['last_error'])}" if v["last_error"] else ""))
        run_ = v["running"]
        out.print("  running:    " + (f"{run_['model']}/{run_['version']} (digest "
                                      f"{run_['digest']})" if run_ else "nothing reported"),
                  soft_wrap=True)
        a = v["assigned"]
        out.print("  assigned:   " + (f"{a['model']}/{a['version']} (counter {a['counter']})"
                                      if a else "-"))
        out.print("  trust root: " + (str(v["trust_root_version"])
                                      if v["trust_root_version"] is not None
                                      else "not reported"))
        tags = ", ".join(f"{k}={val}" for k, val in sorted(v["tags"].items())) or "-"
        out.print(f"  group:      {v['group'] or '-'}; tags: {escape(tags)}")
        out.print(f"  rollout:    {v['rollout'] or '-'}")
        t = v["telemetry"]
        out.print("  telemetry:  " + (
            f"last window {t['last_seen']} (seq {t['window_seq']}), p95 "
            f"{t['latency_ms_p95']:.2f} ms; totals {t['inferences']:,} inferences, "
            f"{t['errors']:,} errors" if t else "none yet"))
        out.print(f"  enrolled at ledger seq {v['enrolled_seq']}; updated {v['updated']}")
        if v["reports"]:
            table = Table(key_column("seq", 4), "time (UTC)", "report", "model", "counter",
                          "reason", title="last status reports")
            for r in v["reports"]:
                table.add_row(str(r["seq"]), r["time"] or "-",
                              r["event"].removeprefix("device.update_"),
                              f"{r['model']}/{r['version']}" if r["model"] else "-",
                              str(r["counter"]), escape(r["reason"] or ""))
            out.print(table)
        else:
            out.print("  no status reports yet")
        out.print(f"history: {v['history']}")

    show(view, as_json, render)


@device_commands.command("history", epilog=examples(
    'hub device history dev-1 --home hub-home',
    'hub device history dev-1 --home hub-home --json',
))
def device_history(
    device_id: str = typer.Argument(..., help="Device id."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """What the device said it ran, and when: every ledger event about it, with each
    status report's device signature checked here against the key enrolled in the
    ledger. Exit 1 if any signature does not check."""
    # The check lives beside the hub's report intake, a module that also holds SQL; it is
    # imported here, not at the top, so the rest of the CLI loads no server module.
    from hub.devices.reads import report_signature

    result = call(hub_config(home, nats_url), key, timeout, "device.history",
                  {"device": device_id})
    public = result["public"]
    rows = []
    for e in result["events"]:
        p = e["payload"]
        when, signature = e["ts"], "n/a (operator)" if "command" in p else "n/a (hub)"
        if "report" in p or e["actor"] == device_id:
            signature = report_signature(p, public)
            try:
                report = read_report(p["report"])[0] if "report" in p else None
            except ProtocolError:
                report = None
            if isinstance(report, StatusReport):
                when = report.ts
        # --json: RFC 3339, model and version apart, the full digest, null when absent.
        digest = p.get("digest")
        rows.append({"seq": e["seq"], "ts": when, "time": rfc3339(when), "event": e["kind"],
                     "model": p.get("model") or None,
                     "version": str(p["version"]) if p.get("model") else None,
                     "digest": digest.hex() if isinstance(digest, bytes) else digest or None,
                     "counter": p.get("counter"), "signature": signature})

    def render(rows: list[dict[str, Any]]) -> None:
        table = Table(key_column("seq", 4), "time (UTC)", "event", "model", "digest",
                      "counter", "signature",
                      title=f"history of {device_id} (times of device events: as signed)")
        for r in rows:
            style = "red" if r["signature"] in ("INVALID", "unsigned") else None
            table.add_row(str(r["seq"]), utc_time(r["ts"]), r["event"],
                          f"{r['model']}/{r['version']}" if r["model"] else "-",
                          (r["digest"] or "")[:16],
                          "-" if r["counter"] is None else str(r["counter"]), r["signature"],
                          style=style)
        out.print(table)

    show(rows, as_json, render)
    if any(r["signature"] in ("INVALID", "unsigned") for r in rows):
        raise typer.Exit(EXIT_REFUSED)


@commands.command(epilog=examples(
    'hub devices --home hub-home',
    'hub devices --state failed --home hub-home',
    'hub devices --all --json --home hub-home',
    'hub devices -l group=prod,site=a --home hub-home',
    'hub devices --state assigned --watch 2 --home hub-home',
))
def devices(
    state: str | None = typer.Option(None, "--state", help="Only devices in this state "
                                     "(enrolled, assigned, applied, failed, reverted, revoked)."),
    labels: str | None = typer.Option(
        None, "-l", "--selector", help="Only devices with these labels: KEY=VALUE joined by "
        "commas (AND); `group` is the device's group, other keys its tags "
        "(`hub device tag`)."),
    limit: int = typer.Option(100, "--limit", min=1, max=500, help="Devices per page."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many devices first."),
    every: bool = typer.Option(False, "--all", help="Every device, page after page."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT, watch_s: float | None = WATCH,
) -> None:
    """The fleet: each device's model and version (as the device reported it), state,
    last seen, and inference counts from its telemetry; a page at a time (--all for
    all), with how many devices are in each state; --watch redraws it until Ctrl-C."""
    body: dict[str, Any] = {"limit": limit, "offset": offset}
    if state is not None:
        body["state"] = state
    if labels is not None:
        body["labels"] = labels

    async def fetch(client: HubClient) -> dict[str, Any]:
        page = await (client.all_pages("devices", body) if every
                      else client.call("devices", body))
        return {**page, "offset": offset}

    def render(result: dict[str, Any]) -> None:
        rows = result["devices"]
        states = ", ".join(f"{n:,} {s}" for s, n in sorted(result["states"].items()))
        shown = (f"{offset + 1:,}-{offset + len(rows):,} of {result['device_count']:,}"
                 if rows else f"none of {result['device_count']:,}")
        table = Table(key_column("device"), "model/version", "state", "last seen", "inferences",
                      "errors", "p95 ms",
                      title=f"devices {shown}" + (f" ({states})" if states else ""))
        for r in rows:
            running = f"{r['model']}/{r['version']}" if r["model"] else "-"
            shown_state = r["state"]
            if shown_state in ("failed", "reverted"):
                shown_state = f"[red]{shown_state}[/red]: {r['last_error'] or ''}"[:80]
            elif shown_state == "assigned":
                shown_state = f"assigned {r['assigned_model']}/{r['assigned_version']}"
            table.add_row(r["device"], running, shown_state, ago(r["last_seen"]),
                          f"{r['inferences'] or 0:,}", f"{r['errors'] or 0:,}",
                          f"{r['latency_ms_p95'] or 0:.2f}")
        out.print(table)
        if result["next_offset"] is not None and not every:
            out.print(f"more: --offset {result['next_offset']} (or --all)")

    if watch_s is not None:
        watch(hub_config(home, nats_url), key, timeout, watch_s, fetch,
              lambda r: show(devices_json(r) if as_json else r, as_json, render), as_json)
        return
    result = run(hub_config(home, nats_url), key, timeout, fetch)
    show(devices_json(result) if as_json else result, as_json, render)


def devices_json(result: dict[str, Any]) -> dict[str, Any]:
    """`hub devices --json`: `last_seen` in RFC 3339 (the hub keeps nanoseconds), an RFC
    3339 `updated` beside the ledger's `updated_ts`."""
    return {**result, "devices": [
        {**r, "last_seen": rfc3339(r["last_seen"]), "updated": rfc3339(r["updated_ts"])}
        for r in result["devices"]]}


# `hub deploy --wait` exit codes (also in its help).
EXIT_DEPLOY_PENDING = 3  # the wait timed out with devices still pending
SETTLED = ("applied", "failed", "reverted", "revoked")


def deploy_summary(deployment: str, model: str, version: str, targets: list[str],
                   rows: dict[str, dict[str, Any]], timed_out: bool) -> dict[str, Any]:
    """Where each targeted device stands: `applied`, `failed`, `reverted`, `revoked` or
    `pending` (no outcome of this release yet), with the reason of a failure."""
    devices: dict[str, dict[str, Any]] = {}
    for device in targets:
        row = rows.get(device, {})
        mine = (row.get("assigned_model"), row.get("assigned_version")) == (model, version)
        state = row.get("state", "pending")
        if state not in SETTLED or (not mine and state != "revoked"):
            state = "pending"
        devices[device] = {"state": state, "reason": row.get("last_error")
                           if state in ("failed", "reverted", "revoked") else None}
    counts = {s: sum(1 for d in devices.values() if d["state"] == s)
              for s in (*SETTLED, "pending")}
    return {"deployment": deployment, "model": model, "version": version,
            "devices": devices, "counts": counts, "timed_out": timed_out}


async def wait_for_outcomes(client: HubClient, result: dict[str, Any], model: str,
                            version: str, wait_timeout: float, interval: float,
                            progress: bool) -> dict[str, Any]:
    """Poll `devices` until every device of the deployment has an outcome (or the wait
    times out), with a progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    targets: list[str] = result["devices"]
    deadline = asyncio.get_running_loop().time() + wait_timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), console=err,
                  disable=not progress) as bar:
        task = bar.add_task(f"{model}/{version}", total=len(targets), detail="")
        while True:
            page = await client.all_pages("devices", {"offset": 0})
            rows = {r["device"]: r for r in page["devices"]}
            now = asyncio.get_running_loop().time()
            summary = deploy_summary(result["deployment"], model, version, targets, rows,
                                     timed_out=now >= deadline)
            c = summary["counts"]
            bar.update(task, completed=len(targets) - c["pending"],
                       detail=f"{c['applied']} applied, {c['failed']} failed, "
                              f"{c['reverted']} reverted")
            if not c["pending"] or summary["timed_out"]:
                return summary
            await asyncio.sleep(min(interval, max(deadline - now, 0.05)))


@commands.command(epilog=examples(
    'hub deploy kws/1 --all --home hub-home',
    'hub deploy kws/2 --device dev-1 --device dev-2 --home hub-home',
    'hub deploy kws/2 --all --wait --wait-timeout 300 --home hub-home',
    'hub deploy --model kws --version 1 --all --home hub-home    (the older spelling)',
))
def deploy(
    ref: str | None = typer.Argument(None, help="NAME/VERSION of a released model (or "
                                     "--model and --version).", metavar="[NAME/VERSION]"),
    model: str | None = typer.Option(None, "--model", help="Model name (or NAME/VERSION)."),
    version: str | None = typer.Option(None, "--version", help="Model version (must be "
                                       "released)."),
    device: list[str] = typer.Option([], "--device", help="Target device (repeatable)."),
    all_devices: bool = typer.Option(False, "--all", help="Target every enrolled device "
                                     "(revoked devices are skipped; a revoked --device is "
                                     "refused)."),
    wait: bool = typer.Option(False, "--wait", help="Then wait, with a progress bar, until "
                              "every targeted device reports applied, failed or reverted, "
                              "and print a summary (exit codes below)."),
    wait_timeout: float = typer.Option(600.0, "--wait-timeout", min=0,
                                       help="With --wait: give up after this many seconds."),
    interval: float = typer.Option(1.0, "--interval", min=0.05,
                                   help="With --wait: seconds between polls."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Assign a released model version to devices (operator role): a signed assignment per
    device goes into the KV bucket the agents watch, and each is recorded in the ledger.

    With --wait the exit status says how it went: 0 every device applied it, 1 any
    failed, reverted or was revoked meanwhile, 3 --wait-timeout passed with devices
    still pending (2: a usage error, as everywhere)."""
    model, version = resolve_ref(ref, model, version)
    if bool(device) == all_devices:
        raise UsageError("give --device ID (one or more) or --all, not both")
    body: dict[str, Any] = {"model": model, "version": version}
    body.update({"all": True} if all_devices else {"devices": device})
    def render(r: dict[str, Any]) -> None:
        skipped = r.get("skipped_revoked") or []
        out.print(f"{r['deployment']}: {model}/{version} assigned to {len(r['devices'])} "
                  f"device(s)" + (f"; {len(skipped)} revoked device(s) skipped"
                                  if skipped else "") + "; watch with `hub devices`")

    config = hub_config(home, nats_url)
    if not wait:
        show(call(config, key, timeout, "deploy", body), as_json, render)
        return

    async def deploy_and_wait(client: HubClient) -> dict[str, Any]:
        result = await client.call("deploy", body)
        if not as_json:
            render(result)
        return await wait_for_outcomes(client, result, model, version, wait_timeout,
                                       interval, progress=not as_json)

    def render_summary(summary: dict[str, Any]) -> None:
        c = summary["counts"]
        out.print(f"{summary['deployment']}: {c['applied']} applied, {c['failed']} failed, "
                  f"{c['reverted']} reverted, {c['revoked']} revoked, {c['pending']} pending"
                  + (" (wait timed out)" if summary["timed_out"] else ""))
        for device, d in sorted(summary["devices"].items()):
            if d["state"] != "applied":
                out.print(f"  {escape(device)}: {d['state']}"
                          + (f": {escape(d['reason'])}" if d["reason"] else ""))

    summary = show(run(config, key, timeout, deploy_and_wait), as_json,
                   render_summary)
    c = summary["counts"]
    if c["pending"]:
        raise typer.Exit(EXIT_DEPLOY_PENDING)
    if c["applied"] != len(summary["devices"]):
        raise typer.Exit(EXIT_REFUSED)
