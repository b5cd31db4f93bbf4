"""Structured logs: one line per event, `event key=value ...` or JSON lines.

Code logs an event name as the message and its fields as `extra`:
    log.info("turn.answered", extra={"conversation": "discord:123", "seconds": 1.2})
Message contents and secrets are never passed as fields at INFO.
"""

from __future__ import annotations

import json
import logging
import sys

# Attributes every LogRecord has; anything else on a record came in through `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


def _value(value: object) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(ch in text for ch in ' "=\n') else text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} {record.levelname} {record.name} {record.getMessage()}"
        fields = " ".join(f"{key}={_value(value)}" for key, value in _fields(record).items())
        if fields:
            line += " " + fields
        if record.exc_info:
            line += " exception=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **{key: value if isinstance(value, (int, float, bool)) or value is None else str(value) for key, value in _fields(record).items()},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Log to stderr; third-party libraries only from WARNING up, so INFO stays ours."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for ours in ("bot", "model", "adapters"):
        logging.getLogger(ours).setLevel(level)
