"""The HTML audit report (`ledger report`): one self-contained file an auditor can open
from disk or print.

data.py gathers what the report shows from the ledger alone (through a Source of
ledger/storage/at.py, with the signature checks of `ledger at`); charts.py lays out the
inline SVG charts as plain geometry; render.py fills the Jinja2 templates of
templates/, with autoescaping on, so every string from the ledger is escaped.
Verification is not done here: the report shows the Verdict `ledger verify` computed.
"""

from __future__ import annotations

from ledger.report.data import ReportData, gather
from ledger.report.render import render_report

__all__ = ["ReportData", "gather", "render_report"]
