"""The one structured log line every daemon writes (logfmt: key=value ...).

It lives in `protocol` because it is a format peers and tools agree on, like
the wire format: `ts=2026-11-23T17:31:02.123 level=info role=server
event=ready addr=tcp://127.0.0.1:5555`. Pure formatting; no handlers here.
"""
from __future__ import annotations

import logging
import time

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    """Formats a record as `ts=... level=... logger=... msg=... key=value ...`.

    Extra fields passed with `logger.info("...", extra={"job": "j1"})` become
    keys of their own.
    """

    def __init__(self, role: str = ""):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        parts = [f"ts={ts}", f"level={record.levelname.lower()}"]
        if self.role:
            parts.append(f"role={self.role}")
        parts.append(f"msg={_quote(record.getMessage())}")
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(role: str, level: str = "info") -> None:
    """Send every `pscluster.*` logger to stderr as logfmt lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter(role))
    root = logging.getLogger("pscluster")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
