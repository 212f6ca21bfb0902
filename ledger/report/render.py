"""The report's HTML: the Jinja2 templates of templates/ filled from a ReportData.

Autoescaping is on for every template (not chosen by file name), and no ledger value
is ever used as template source: a device called `{{7*7}}` is shown as those seven
characters. The page is self-contained: inline CSS, inline SVG, no script, no URL.
"""

from __future__ import annotations

import jinja2

from ledger.report import charts
from ledger.report.data import GATES, ReportData, utc


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("ledger.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def rollout_charts(data: ReportData) -> dict[str, list[charts.Chart]]:
    """Per rollout id: its wave progress, then one chart per gate with evidence."""
    out: dict[str, list[charts.Chart]] = {}
    for r in data.rollouts:
        drawn = [charts.progress("Devices per wave (applied, failed, pending)", [
            (f"wave {w.index} ({w.outcome})", int(w.evidence.get("devices", w.size)),
             int(w.evidence.get("applied", 0)), int(w.evidence.get("failed", 0)))
            for w in r.waves])]
        for key, _, label in GATES:
            rows = [(f"wave {w.index}", float(w.evidence[key])) for w in r.waves
                    if isinstance(w.evidence.get(key), int | float)]
            if rows:
                drawn.append(charts.bars(f"Gate: {label} per wave", rows,
                                         limit=r.gates.get(key)))
        out[r.id] = drawn
    return out


def render_report(data: ReportData) -> str:
    """The whole report as one HTML document."""
    fleet = charts.bars("Devices by the model version they last reported", [
        (label, float(n)) for label, n in data.fleet]) if data.fleet else None
    timelines = {h.device: charts.timeline(
        "What ran when", h.start_ns, h.end_ns,
        [(s.start, s.end, f"{s.label} (seq {s.seq})") for s in h.spans],
        utc(h.start_ns), utc(h.end_ns)) for h in data.devices}
    template = _environment().get_template("report.html.j2")
    return template.render(data=data, fleet_chart=fleet, rollout_charts=rollout_charts(data),
                           timelines=timelines, utc=utc)
