"""The one structured log line every daemon writes: logfmt (key=value ...) or JSON.

It lives in `protocol` because it is a format peers and tools agree on, like
the wire format: `ts=2026-11-23T17:31:02.123+00:00 level=info role=server
msg=serving addr=tcp://127.0.0.1:5555`, or with `--log-format json` (or
PSCLUSTER_LOG_FORMAT=json) one JSON object per line with the same keys.
Timestamps are UTC, with their offset, to the millisecond. Pure formatting;
the only handler is the one `setup_logging` installs on stderr.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

LOG_FORMATS = ("logfmt", "json")
LOG_FORMAT_ENV = "PSCLUSTER_LOG_FORMAT"


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def utc_timestamp(created: float) -> str:
    """`created` (seconds since the epoch) as 2026-12-01T17:04:57.679+00:00."""
    return datetime.fromtimestamp(created, tz=timezone.utc).isoformat(timespec="milliseconds")


def _extras(record: logging.LogRecord) -> dict:
    """The fields passed with `extra={...}`."""
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


class LogfmtFormatter(logging.Formatter):
    """Formats a record as `ts=... level=... role=... msg=... key=value ...`.

    Extra fields passed with `logger.info("...", extra={"job": "j1"})` become
    keys of their own.
    """

    def __init__(self, role: str = ""):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={utc_timestamp(record.created)}", f"level={record.levelname.lower()}"]
        if self.role:
            parts.append(f"role={self.role}")
        parts.append(f"msg={_quote(record.getMessage())}")
        for key, value in _extras(record).items():
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(LogfmtFormatter):
    """Formats a record as one JSON object: ts, level, role, msg, then the extra fields (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": utc_timestamp(record.created), "level": record.levelname.lower()}
        if self.role:
            obj["role"] = self.role
        obj["msg"] = record.getMessage()
        for key, value in _extras(record).items():
            obj.setdefault(key, value)  # an extra field never hides one of the four above
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, separators=(",", ":"))


def log_format(option: str | None = None) -> str:
    """The format asked for: `option`, else PSCLUSTER_LOG_FORMAT, else logfmt; ValueError if unknown."""
    fmt = (option or os.environ.get(LOG_FORMAT_ENV) or "logfmt").strip().lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    return fmt


def setup_logging(role: str, level: str = "info", fmt: str | None = None) -> None:
    """Send every `pscluster.*` logger to stderr, one line per record, in `fmt` (see log_format)."""
    handler = logging.StreamHandler()
    formatter = JsonFormatter if log_format(fmt) == "json" else LogfmtFormatter
    handler.setFormatter(formatter(role))
    root = logging.getLogger("pscluster")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
