"""Log output of the long-running commands (`hub serve`, `edge-agent run`, `ledger
witness`), chosen with `--log-format`:

- `auto` (the default): rich's coloured lines when stderr is a terminal, else `plain`;
- `plain`: one line per record, `TIME LEVEL LOGGER: MESSAGE` (no boxes, no wrapping);
- `json`: one JSON object per line with `ts` (RFC 3339, UTC), `level`, `logger`,
  `message` and every extra field the record carries (`reason`, `attempt`, ...); an
  exception becomes an `error` field (its one-line message) and, at DEBUG, `traceback`.

nats-py's own logger prints a traceback for every failed (re)connect; the commands pass
their own error callbacks, and its logger is kept at CRITICAL so nothing leaks past them.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("auto", "plain", "json")
LOG_FORMAT_HELP = ("auto (coloured on a terminal, else plain), plain (one line per "
                   "record) or json (one JSON object per line).")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def __init__(self, prefix: str = "", debug: bool = False) -> None:
        super().__init__()
        self.prefix = prefix
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name,
            "message": self.prefix + record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            out.setdefault("error", " ".join(str(record.exc_info[1]).split())
                           or type(record.exc_info[1]).__name__)
            if self.debug:
                out["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """One line per record; a traceback only at DEBUG (else the error's message)."""

    def __init__(self, prefix: str = "", debug: bool = False) -> None:
        super().__init__(f"%(asctime)s %(levelname)s %(name)s: {prefix.replace('%', '%%')}"
                         "%(message)s")
        self.debug = debug

    def formatException(self, ei: Any) -> str:
        if self.debug:
            return super().formatException(ei)
        return f"  error: {' '.join(str(ei[1]).split()) or type(ei[1]).__name__}"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if self.debug else text.replace("\n", " ")


def configure_logging(level: str, log_format: str = "auto", prefix: str = "") -> None:
    """Set up the root logger for a long-running command; ValueError for an unknown
    format. `prefix` starts every message (the agent's device id)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    debug = level.upper() == "DEBUG"
    handler: logging.Handler
    if log_format == "auto" and sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter(f"{prefix.replace('%', '%%')}%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(prefix, debug) if log_format == "json"
                             else PlainFormatter(prefix, debug))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("nats").setLevel(logging.CRITICAL)
