"""`hub telemetry`: inference telemetry of the fleet or of one device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from hub.cli._common import (
    HOME,
    JSON,
    KEY,
    NATS_URL,
    TIMEOUT,
    ago,
    call,
    examples,
    hub_config,
    out,
    run,
    show,
)
from hub.client import HubClient
from hub.errors import UsageError
from hub.wire import DEVICE_SORTS, MAX_TELEMETRY_PAGE, TELEMETRY_PAGE

commands = typer.Typer()

SORT_HELP = ("Order of the device table: " + ", ".join(DEVICE_SORTS)
             + " (error-rate: the worst first; last-seen: the quietest first).")


@commands.command("telemetry", epilog=examples(
    'hub telemetry --home hub-home',
    'hub telemetry --device dev-1 --home hub-home',
    'hub telemetry --sort last-seen --all --json --home hub-home',
))
def telemetry(
    device: str | None = typer.Option(None, "--device", help="One device's view."),
    limit: int = typer.Option(TELEMETRY_PAGE, "--limit", min=1, max=MAX_TELEMETRY_PAGE,
                              help="Devices to show (one page)."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many devices first."),
    sort: str = typer.Option("error-rate", "--sort", help=SORT_HELP),
    every: bool = typer.Option(False, "--all", help="Every device, fetched page by page "
                               "(with --json: the whole fleet as one document)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Inference telemetry: fleet totals per model version and one page of devices (the
    worst error rates first), or one device's windows per installed model (counts,
    errors, p95, output histograms, spool drops)."""
    if sort not in DEVICE_SORTS:
        raise UsageError(f"unknown --sort {sort!r}; use one of {', '.join(DEVICE_SORTS)}")
    config = hub_config(home, nats_url)
    if device is not None:
        show(call(config, key, timeout, "telemetry", {"device": device}), as_json,
             lambda result: _render_device(device, result))
        return
    body = {"sort": sort, "offset": offset, "limit": MAX_TELEMETRY_PAGE if every else limit}

    async def fetch(client: HubClient) -> dict[str, Any]:
        page = await (client.all_pages("telemetry", body) if every
                      else client.call("telemetry", body))
        return {**page, "offset": offset, "limit": len(page["devices"])}

    show(run(config, key, timeout, fetch), as_json,
         lambda result: _render_fleet(result, offset, sort))


def _render_fleet(result: dict[str, Any], offset: int, sort: str) -> None:
    table = Table("model/version", "inferences", "errors", "error rate",
                  title=(f"fleet telemetry: {result['windows']:,} windows, "
                         f"{result['duplicates']:,} duplicates ignored, "
                         f"{result['dropped']:,} dropped on devices, ingest lag "
                         f"{result['ingest_lag_s']:.2f}s"))
    for r in result["fleet"]:
        rate = r["errors"] / r["inferences"] if r["inferences"] else 0.0
        table.add_row(f"{r['model']}/{r['version']}", f"{r['inferences']:,}",
                      f"{r['errors']:,}", f"{rate:.4f}")
    out.print(table)
    rows = result["devices"]
    shown = (f"devices {offset + 1}-{offset + len(rows)} of {result['device_count']:,}"
             if rows else f"no devices past {offset} of {result['device_count']:,}")
    devices = Table("device", "model/version", "windows", "inferences", "errors",
                    "error rate", "p95 ms", "last window", "drops",
                    title=f"{shown}, by {sort}")
    for r in rows:
        devices.add_row(r["device"], f"{r['model']}/{r['version']}", f"{r['windows']:,}",
                        f"{r['inferences']:,}", f"{r['errors']:,}",
                        f"{r['error_rate']:.4f}",
                        "-" if r["p95_ms"] is None else f"{r['p95_ms']:.3f}",
                        ago(r["last_ts"]), str(r["dropped"]))
    if rows:
        out.print(devices)
    else:
        out.print(shown)


def _render_device(device: str, result: dict[str, Any]) -> None:
    rows = result["devices"]
    if not rows:
        out.print(f"no telemetry from {device} yet")
        return
    table = Table("model/version", "counter", "windows", "inferences", "errors", "p95 ms",
                  "output histogram (first output)", "last window", title=device)
    for r in rows:
        hist = r["output_hist"][0] if r["output_hist"] else []
        table.add_row(f"{r['model']}/{r['version']}", str(r["counter"]), str(r["windows"]),
                      f"{r['inferences']:,}", f"{r['errors']:,}",
                      "-" if r["p95_ms"] is None else f"{r['p95_ms']:.3f}",
                      " ".join(map(str, hist)) or "-", ago(r["last_ts"]))
    out.print(table)
    out.print(f"spool drops reported by the device: {rows[0]['dropped']}; duplicate windows "
              f"ignored: {rows[0]['duplicates']}")
