"""The report's charts as plain geometry: rectangles, lines and labels in SVG user units.

Nothing here writes markup; templates/charts.html.j2 draws these shapes with every
label escaped. Pure functions of their inputs, so the layout is tested without HTML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WIDTH = 640
ROW = 22
LABEL_W = 180
VALUE_W = 90


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    css: str  # a class of the report's stylesheet: bar, ok, bad, pending, span
    title: str  # shown on hover, and to screen readers


@dataclass(frozen=True)
class Text:
    x: float
    y: float
    text: str
    anchor: str = "start"


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    css: str = "limit"


@dataclass
class Chart:
    title: str
    width: float = WIDTH
    height: float = 0
    rects: list[Rect] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)


def bars(title: str, rows: list[tuple[str, float]], unit: str = "",
         limit: float | None = None) -> Chart:
    """Horizontal bars, one a row, scaled to the largest value (or the limit, drawn as
    a dashed line: a gate's threshold)."""
    chart = Chart(title, height=ROW * len(rows) + (ROW if limit is not None else 6))
    top = max([v for _, v in rows] + ([limit] if limit is not None else []) + [0.0])
    span = WIDTH - LABEL_W - VALUE_W
    for i, (label, value) in enumerate(rows):
        y = i * ROW
        w = span * value / top if top > 0 else 0.0
        css = "bad" if limit is not None and value > limit else "bar"
        chart.rects.append(Rect(LABEL_W, y + 3, max(w, 1.0), ROW - 6, css,
                                f"{label}: {_num(value)}{unit}"))
        chart.texts.append(Text(LABEL_W - 6, y + ROW - 7, _cut(label), "end"))
        chart.texts.append(Text(LABEL_W + max(w, 1.0) + 4, y + ROW - 7, f"{_num(value)}{unit}"))
    if limit is not None and top > 0:
        x = LABEL_W + span * limit / top
        bottom = ROW * len(rows)
        chart.lines.append(Line(x, 0, x, bottom))
        chart.texts.append(Text(x, bottom + ROW - 7, f"limit {_num(limit)}{unit}", "middle"))
    return chart


def progress(title: str, rows: list[tuple[str, int, int, int]]) -> Chart:
    """Stacked bars per wave: (label, devices, applied, failed); the rest is pending."""
    chart = Chart(title, height=ROW * len(rows) + 6)
    span = WIDTH - LABEL_W - VALUE_W
    for i, (label, devices, applied, failed) in enumerate(rows):
        y = i * ROW
        x = float(LABEL_W)
        pending = max(devices - applied - failed, 0)
        for count, css, what in ((applied, "ok", "applied"), (failed, "bad", "failed"),
                                 (pending, "pending", "pending")):
            if devices and count:
                w = span * count / devices
                chart.rects.append(Rect(x, y + 3, w, ROW - 6, css, f"{label}: {count} {what}"))
                x += w
        if not devices:
            chart.rects.append(Rect(x, y + 3, span, ROW - 6, "pending", f"{label}: no device"))
        chart.texts.append(Text(LABEL_W - 6, y + ROW - 7, _cut(label), "end"))
        chart.texts.append(Text(LABEL_W + span + 4, y + ROW - 7,
                                f"{applied}/{devices} applied" + (f", {failed} failed"
                                                                  if failed else "")))
    return chart


def timeline(title: str, start: int, end: int, spans: list[tuple[int, int, str]],
             first: str, last: str) -> Chart:
    """What ran when: one bar per (start, end, label) on a time axis from `start` to
    `end`, labelled `first` and `last` at its ends."""
    chart = Chart(title, height=2 * ROW + 8)
    span = WIDTH - 20
    total = max(end - start, 1)
    for i, (a, b, label) in enumerate(spans):
        x = 10 + span * (max(a, start) - start) / total
        w = max(span * (min(b, end) - max(a, start)) / total, 2.0)
        chart.rects.append(Rect(x, 4, w, ROW, f"span{i % 4}", label))
        if w > 60:
            chart.texts.append(Text(x + 4, ROW - 2, _cut(label, 24)))
    chart.lines.append(Line(10, ROW + 8, 10 + span, ROW + 8, "axis"))
    chart.texts.append(Text(10, 2 * ROW + 4, first))
    chart.texts.append(Text(10 + span, 2 * ROW + 4, last, "end"))
    return chart


def _num(value: float) -> str:
    return f"{value:.4g}"


def _cut(label: str, width: int = 28) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"
