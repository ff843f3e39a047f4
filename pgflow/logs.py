"""Logging: one line per event, ``key=value`` (or JSON), level by setting."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update(getattr(record, "kv", {}))
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update(getattr(record, "kv", {}))
        return json.dumps(fields, default=str)


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' ="\n')) else text


def setup(level: str = "info", fmt: str = "kv") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger("pgflow")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def kv(**fields: Any) -> dict[str, Any]:
    """``log.info("scraped", extra=kv(instance=..., rows=...))``"""
    return {"kv": fields}


def error_summary(exc: BaseException) -> str:
    """An unexpected exception for a log line. A Unicode error's repr carries the whole string it
    failed on (a statement's text: literals, comments), so only its kind and reason are given."""
    if isinstance(exc, UnicodeError):
        return f"{type(exc).__name__}: {getattr(exc, 'encoding', '?')}: {getattr(exc, 'reason', '')}"[:300]
    return repr(exc)[:300]
