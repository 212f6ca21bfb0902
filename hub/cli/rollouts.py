"""`hub device tag` and `hub rollout create|start|pause|resume|abort|rollback|list|status`:
staged rollouts and the groups and tags they target."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import typer
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

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

rollout_app = typer.Typer(
    help=("Staged rollouts: target devices by group/tag, roll out in waves with success, "
          "failure and telemetry gates (error rate, p95 latency, output drift), bake time, "
          "automatic halt and rollback. Every step is a ledger event with its numbers."),
    no_args_is_help=True,
    epilog=examples(
    'hub rollout create kws/2 --target group=lab --waves 10%,100% --bake 60s --home hub-home',
    'hub rollout start r-1 --home hub-home',
    'hub rollout status r-1 --watch --home hub-home',
),
)

TERMINAL = ("completed", "aborted", "rolled_back")
STATE_STYLE = {"completed": "green", "done": "green", "running": "cyan", "rolling": "cyan",
               "baking": "yellow", "paused": "yellow", "halted": "red", "aborted": "red",
               "rolled_back": "magenta", "created": "white", "pending": "dim"}


def _style(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


device_commands = typer.Typer()  # under `hub device`


@device_commands.command("tag", epilog=examples(
    'hub device tag dev-1 --group lab --home hub-home',
    'hub device tag dev-1 --tag site=a --untag old --home hub-home',
))
def device_tag(
    device_id: str = typer.Argument(..., help="Enrolled device id."),
    group: str | None = typer.Option(None, "--group", help="Set the device's group."),
    tag: list[str] = typer.Option([], "--tag", help="Set a tag KEY=VALUE (repeatable)."),
    untag: list[str] = typer.Option([], "--untag", help="Remove tag KEY (repeatable)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Put a device in a group and/or set tags; rollouts target them
    (`--target group=lab`, `--target tag:site=a`)."""
    tags: dict[str, str] = {}
    for item in tag:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"--tag takes KEY=VALUE, got {item!r}")
        tags[k] = v
    body: dict[str, Any] = {"device": device_id, "tags": tags, "untag": untag}
    if group is not None:
        body["group"] = group

    def render(result: dict[str, Any]) -> None:
        tag_text = ", ".join(f"{k}={v}" for k, v in result["tags"].items()) or "no tags"
        out.print(f"{device_id}: group {result['group'] or '-'}, {tag_text} "
                  f"(ledger seq {result['seq'][0]})")

    show(call(hub_config(home, nats_url), key, timeout, "device.tag", body), as_json, render)


@rollout_app.command("create", epilog=examples(
    'hub rollout create kws/2 --home hub-home',
    "hub rollout create kws/2 --target group=lab,tag:site=a --waves 1,50%,100% "
    "--max-p95-ms 20 --auto-rollback --home hub-home",
    'hub rollout create kws/2 -l group=prod,site=a --home hub-home',
    'hub rollout create --model kws --version 2 --home hub-home    (the older spelling)',
))
def rollout_create(
    ref: str | None = typer.Argument(None, help="NAME/VERSION of a released model (or "
                                     "--model and --version).", metavar="[NAME/VERSION]"),
    model: str | None = typer.Option(None, "--model", help="Model name (or NAME/VERSION)."),
    version: str | None = typer.Option(None, "--version", help="Released version to roll "
                                       "out."),
    target: str = typer.Option(
        "all", "--target",
        help="Devices: all | group=G | tag:K=V | device=ID|ID, joined by commas (AND)."),
    labels: str | None = typer.Option(
        None, "-l", "--selector", help="Also only devices with these labels: KEY=VALUE "
        "joined by commas (AND); `group` is the group, other keys tags."),
    waves: str = typer.Option("1%,10%,50%,100%", "--waves",
                              help="Cumulative shares or counts; the last must be 100%."),
    min_success: float = typer.Option(0.95, "--min-success",
                                      help="Share of a wave that must apply it."),
    max_failure: float = typer.Option(0.05, "--max-failure",
                                      help="Share of a wave that may fail before a halt."),
    bake: str = typer.Option("0s", "--bake", help="Watch each wave this long (e.g. 60s)."),
    max_error_rate: float | None = typer.Option(None, "--max-error-rate",
                                                help="Gate: inference error rate."),
    max_p95_ms: float | None = typer.Option(None, "--max-p95-ms",
                                            help="Gate: p95 inference latency (ms)."),
    max_psi: float | None = typer.Option(None, "--max-psi",
                                         help="Gate: output drift (PSI vs validation)."),
    min_inferences: int = typer.Option(50, "--min-inferences",
                                       help="Telemetry needed before the gates judge."),
    deadline: str = typer.Option("10m", "--deadline",
                                 help="Per wave: devices silent this long count as failed."),
    auto_rollback: bool = typer.Option(False, "--auto-rollback",
                                       help="On a halt, give affected devices the "
                                            "previous release again."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Plan a rollout (operator role). Wave membership is fixed now, deterministically;
    nothing is assigned until `hub rollout start`."""
    model, version = resolve_ref(ref, model, version)
    body: dict[str, Any] = {
        "model": model, "version": version, "target": target, "waves": waves,
        "min_success": min_success, "max_failure": max_failure, "bake": bake,
        "deadline": deadline, "auto_rollback": auto_rollback,
        "min_inferences": min_inferences,
    }
    if labels is not None:
        body["labels"] = labels
    for name, value in (("max_error_rate", max_error_rate), ("max_p95_ms", max_p95_ms),
                        ("max_psi", max_psi)):
        if value is not None:
            body[name] = value
    show(call(hub_config(home, nats_url), key, timeout, "rollout.create", body), as_json,
         lambda r: out.print(f"{r['rollout']}: {model}/{version} to {r['devices']} device(s) "
                             f"in waves of {', '.join(map(str, r['waves']))}"
                             + (f" ({r['skipped_revoked']} revoked device(s) left out)"
                                if r.get("skipped_revoked") else "")
                             + f"; start it with `hub rollout start {r['rollout']}`"))


TRANSITION_EXAMPLES = {
    'start': [
        'hub rollout start r-1 --home hub-home',
    ],
    'pause': [
        "hub rollout pause r-1 --reason 'weekend freeze' --home hub-home",
    ],
    'resume': [
        'hub rollout resume r-1 --home hub-home',
    ],
    'abort': [
        "hub rollout abort r-1 --reason 'wrong target' --home hub-home",
    ],
    'rollback': [
        "hub rollout rollback r-1 --reason 'p95 too high' --home hub-home",
    ],
}


def _transition(verb: str, doc: str) -> None:
    def command(
        rollout: str = typer.Argument(..., help="Rollout id (r-N)."),
        reason: str = typer.Option("", "--reason", help="Why, for the record."),
        home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
        as_json: bool = JSON, timeout: float = TIMEOUT,
    ) -> None:
        def render(result: dict[str, Any]) -> None:
            line = f"{rollout}: {result['state']} (ledger seq {result['seq'][0]})"
            if verb == "rollback":
                line += f"; {len(result['devices'])} device(s) get their previous release"
                if result["skipped"]:
                    line += f", {len(result['skipped'])} skipped"
            out.print(line)

        show(call(hub_config(home, nats_url), key, timeout, f"rollout.{verb}",
                  {"rollout": rollout, "reason": reason}), as_json, render)

    command.__doc__ = doc
    rollout_app.command(verb, epilog=examples(*TRANSITION_EXAMPLES[verb]))(command)


_transition("start", "Start a created rollout: the controller assigns wave 1.")
_transition("pause", "Pause: no new wave starts, nothing is halted.")
_transition("resume", "Resume a paused rollout.")
_transition("abort", "Abort: no more waves; devices keep what they run now. To give "
                     "the devices that took the new release their previous one, run "
                     "`hub rollout rollback` afterwards.")
_transition("rollback", "Roll back: devices that took the new release get the one they "
                        "ran before (also after an abort or completion; devices given "
                        "another release since, and revoked ones, are skipped and listed).")


@rollout_app.command("list", epilog=examples(
    'hub rollout list --home hub-home',
    'hub rollout list --json --home hub-home',
    'hub rollout list --watch 2 --home hub-home',
))
def rollout_list(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
                 as_json: bool = JSON, timeout: float = TIMEOUT,
                 watch_s: float | None = WATCH) -> None:
    """Every rollout with its state and device counts; --watch redraws it until Ctrl-C."""
    def render(rows: list[dict[str, Any]]) -> None:
        table = Table(key_column("rollout"), "model/version", "target", "state", "wave", "devices",
                      "applied", "failed", "updated", title=f"{len(rows)} rollout(s)")
        for r in rows:
            c = r["counts"]
            failed = sum(c.get(s, 0) for s in ("failed", "reverted", "timed_out"))
            table.add_row(r["rollout"], f"{r['model']}/{r['version']}", r["target"],
                          _style(r["state"]), f"{r['current_wave'] + 1}/{r['waves']}",
                          str(r["devices"]), str(c.get("applied", 0)), str(failed),
                          ago(r["updated_ts"]))
        out.print(table)

    if watch_s is not None:
        watch(hub_config(home, nats_url), key, timeout, watch_s,
              lambda c: c.call("rollouts", {}),
              lambda r: show(list_json(r) if as_json else r, as_json, render), as_json)
        return
    rows = call(hub_config(home, nats_url), key, timeout, "rollouts")
    show(list_json(rows) if as_json else rows, as_json, render)


def _wave(index: int) -> int | None:
    """The hub's 0-based current wave index as --json shows it: 1-based, null before the
    rollout starts (the hub's -1)."""
    return None if index < 0 else index + 1


def list_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`hub rollout list --json`: waves 1-based as in the tables (the hub counts from 0),
    RFC 3339 times."""
    return [{**r, "current_wave": _wave(r["current_wave"]), "reason": r.get("reason") or None,
             "updated": rfc3339(r.get("updated_ts"))} for r in rows]


def status_json(status: dict[str, Any]) -> dict[str, Any]:
    """`hub rollout status --json`: every wave number 1-based as in the tables (the hub
    counts from 0), RFC 3339 times beside the ledger's nanoseconds."""
    r = status["rollout"]
    doc = {**status,
           "rollout": {**r, "current_wave": _wave(r["current_wave"]),
                       "reason": r.get("reason") or None},
           "waves": [{**w, "wave": w["wave"] + 1} for w in status["waves"]],
           "events": [{**e, "time": rfc3339(e["ts"]),
                       "payload": {**e["payload"], "wave": e["payload"]["wave"] + 1}
                       if isinstance(e["payload"].get("wave"), int) else e["payload"]}
                      for e in status["events"]]}
    if "devices" in status:
        # "" is the hub's "none" for these: null in --json.
        doc["devices"] = [{**d, "wave": d["wave"] + 1,
                           **{k: d.get(k) or None for k in ("reason", "rollback_state",
                                                            "previous_model",
                                                            "previous_version")}}
                          for d in status["devices"]]
    return doc


def render_status(status: dict[str, Any]) -> Group:
    """The status view: header, one progress bar per wave, telemetry, recent events."""
    r = status["rollout"]
    policy = r["policy"]
    header = Text.from_markup(
        f"[bold]{r['rollout']}[/bold] {r['model']}/{r['version']} -> {r['target']}  "
        f"{_style(r['state'])}" + (f"  [red]{r['reason']}[/red]" if r["reason"] else ""))
    gates = [f"success >= {policy.get('min_success')}", f"failure <= {policy.get('max_failure')}",
             f"bake {policy.get('bake_s', 0):g}s", f"deadline {policy.get('deadline_s'):g}s"]
    for name, label in (("max_error_rate", "error rate"), ("max_p95_ms", "p95 ms"),
                        ("max_psi", "PSI")):
        if name in policy:
            gates.append(f"{label} <= {policy[name]}")
    if policy.get("auto_rollback"):
        gates.append("auto-rollback")
    table = Table("wave", "state", "progress", "applied", "failed", "pending", "evidence",
                  expand=False)
    for w in status["waves"]:
        c = w["counts"]
        size = max(c.get("devices", w["size"]), 1)
        done = c.get("applied", 0) + c.get("failed", 0)
        bar = ProgressBar(total=size, completed=done, width=30,
                          complete_style="red" if c.get("failed") else "green")
        ev = w["evidence"]
        evidence = ", ".join(f"{k} {ev[k]}" for k in ("success_rate", "error_rate", "p95_ms",
                                                      "psi") if k in ev)
        table.add_row(str(w["wave"] + 1), _style(w["state"]), bar,
                      f"{c.get('applied', 0)}/{size}", str(c.get("failed", 0)),
                      str(c.get("pending", 0)), evidence)
    t = status["telemetry"]
    telemetry = Text(
        f"telemetry: {t.get('inferences', 0):,} inferences, error rate "
        f"{t.get('error_rate', 0):.4f}"
        + (f", p95 {t['p95_ms']:.3f} ms" if "p95_ms" in t else "")
        + (f", PSI {t['psi']:.4f}" if "psi" in t else ""))
    events = Table("seq", "time", "event", "actor", "detail", box=None, show_header=False)
    for e in status["events"][-8:]:
        p = e["payload"]
        detail = p.get("reason") or (f"wave {p['wave'] + 1}" if "wave" in p else "")
        events.add_row(str(e["seq"]), utc_time(e["ts"]), e["kind"], e["actor"][:16],
                       str(detail))
    return Group(header, Text("gates: " + ", ".join(gates), style="dim"), table, telemetry,
                 events)


@rollout_app.command("status", epilog=examples(
    'hub rollout status r-1 --home hub-home',
    'hub rollout status r-1 --watch --home hub-home',
    'hub rollout status r-1 --devices --json --home hub-home',
))
def rollout_status(
    rollout: str = typer.Argument(..., help="Rollout id (r-N)."),
    watch: bool = typer.Option(False, "--watch", help="Keep updating until it ends."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between updates."),
    devices: bool = typer.Option(False, "--devices", help="Also each device's wave, state "
                                 "and rollback state (every page)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """A rollout's waves (live progress bars with --watch), gates, telemetry and its
    recent ledger events. With --watch, exits 0 when it completes, 1 if it halts,
    is aborted or rolled back."""
    config = hub_config(home, nats_url)
    if not watch:
        body = {"rollout": rollout, "devices": devices}

        async def fetch(client: HubClient) -> Any:
            # Per-device rows come a page at a time; without --devices there are none.
            return await (client.all_pages("rollout.status", body) if devices
                          else client.call("rollout.status", body))

        def render(status: dict[str, Any]) -> None:
            out.print(render_status(status))
            if devices:
                table = Table(key_column("device"), "wave", "state", "rollback", "reason",
                              title=f"{status['device_count']:,} device(s) in {rollout}")
                for d in status["devices"]:
                    table.add_row(d["device"], str(d["wave"] + 1), d["state"],
                                  d["rollback_state"] or "-", (d["reason"] or "")[:60])
                out.print(table)

        status = run(config, key, timeout, fetch)
        show(status_json(status) if as_json else status, as_json, render)
        return

    async def follow(client: HubClient) -> str:
        status = await client.call("rollout.status", {"rollout": rollout})
        with Live(render_status(status), console=out, refresh_per_second=4) as live:
            while status["rollout"]["state"] not in (*TERMINAL, "halted"):
                await asyncio.sleep(interval)
                status = await client.call("rollout.status", {"rollout": rollout})
                live.update(render_status(status))
        return str(status["rollout"]["state"])

    final = run(config, key, timeout, follow)
    if final != "completed":
        raise typer.Exit(EXIT_REFUSED)
