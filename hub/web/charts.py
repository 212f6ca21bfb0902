"""The dashboard's charts: geometry from ledger.report.charts (the audit report's), so
both draw the same pictures; templates/charts.html.j2 of the report turns them into
inline SVG with every label escaped. Server-side and offline: no chart library, no
script."""

from __future__ import annotations

from typing import Any

from ledger.report import charts
from ledger.report.data import GATES

Chart = charts.Chart


def wave_progress(waves: list[dict[str, Any]]) -> Chart:
    return charts.progress("Devices per wave (applied, failed, pending)", [
        (f"wave {w['wave'] + 1} ({w['state']})", int(w["counts"].get("devices", w["size"])),
         int(w["counts"].get("applied", 0)), int(w["counts"].get("failed", 0)))
        for w in waves])


def gates(waves: list[dict[str, Any]], limits: dict[str, Any]) -> list[Chart]:
    """One chart per gate (error rate, p95, PSI) over the waves whose evidence has it,
    with the rollout's limit drawn as a line."""
    out = []
    for key, limit_key, label in GATES:
        rows = [(f"wave {w['wave'] + 1}", float(w["evidence"][key])) for w in waves
                if isinstance(w["evidence"].get(key), int | float)]
        if rows:
            limit = limits.get(limit_key)
            out.append(charts.bars(f"Gate evidence: {label} per wave", rows,
                                   limit=float(limit) if isinstance(limit, int | float)
                                   else None))
    return out


def by_count(title: str, rows: list[tuple[str, int]]) -> Chart | None:
    return charts.bars(title, [(label, float(n)) for label, n in rows]) if rows else None


def values(title: str, rows: list[tuple[str, float]]) -> Chart | None:
    return charts.bars(title, [(label, float(v)) for label, v in rows]) if rows else None


def device_telemetry(rows: list[dict[str, Any]]) -> list[Chart]:
    """Per release the device ran (model/version, assignment counter): inferences,
    error rate and p95 latency; then the output histogram of the newest one."""
    if not rows:
        return []
    label = [f"{r['model']}/{r['version']} #{r['counter']}" for r in rows]
    out = [charts.bars("Inferences per release", [(lb, float(r["inferences"]))
                                                   for lb, r in zip(label, rows, strict=True)]),
           charts.bars("Error rate per release", [
               (lb, r["errors"] / r["inferences"] if r["inferences"] else 0.0)
               for lb, r in zip(label, rows, strict=True)])]
    p95 = [(lb, float(r["p95_ms"])) for lb, r in zip(label, rows, strict=True)
           if isinstance(r.get("p95_ms"), int | float)]
    if p95:
        out.append(charts.bars("p95 latency per release", p95, unit=" ms"))
    newest = max(rows, key=lambda r: r.get("last_ts") or 0)
    hist = newest.get("output_hist") or []
    if hist and isinstance(hist[0], list):
        out.append(charts.bars(
            f"Output histogram of {newest['model']}/{newest['version']} (output 0)",
            [(f"bin {i}", float(n)) for i, n in enumerate(hist[0])]))
    return out
