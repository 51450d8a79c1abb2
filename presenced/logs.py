"""Log output: the default text lines, or one JSON object per line (`--log-format json`).

Text: ``2026-11-23 14:15:26,123 INFO presenced.server.peers.manager: peer link up: ...``.

JSON (for log shippers): ``{"ts": "2026-11-23T14:15:26.123Z", "level": "info", "logger":
"presenced.server.peers.manager", "msg": "peer link up: ..."}``, plus ``"exc"`` (the formatted
traceback) when the record carries an exception, ``"stack"`` for ``stack_info``, and
``"region"`` when a :class:`RegionFilter` is installed (several daemons in one process, as in
`presenced demo`).

Several daemons in one process tell their lines apart by a context variable: each daemon's
task sets :data:`REGION` before it starts, trio copies the context into every task started
from there, and :class:`RegionFilter` copies the value onto each record.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import Final, TextIO

from presenced.config import LOG_FORMATS

__all__ = [
    "LOG_FORMATS",
    "REGION",
    "TEXT_FORMAT",
    "JsonFormatter",
    "RegionFilter",
    "configure_logging",
]


TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_HANDLER_NAME: Final = "presenced"

#: The region whose task is logging, for processes that run several daemons.
REGION: contextvars.ContextVar[str] = contextvars.ContextVar("presenced_region", default="-")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        entry: dict[str, object] = {
            "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        region = getattr(record, "region", None)
        if region is not None:
            entry["region"] = region
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class RegionFilter(logging.Filter):
    """Stamps each record with ``record.region`` from :data:`REGION` (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.region = REGION.get()
        return True


def configure_logging(
    level: str,
    fmt: str = "text",
    *,
    text_format: str = TEXT_FORMAT,
    datefmt: str | None = None,
    regions: bool = False,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send log records at ``level`` and above to stderr as text or JSON lines.

    Replaces the handler an earlier call installed (others, like a test runner's, stay), so
    calling it again reconfigures rather than doubling every line. ``regions`` adds a
    :class:`RegionFilter` (``text_format`` may then use ``%(region)s``). Returns the handler.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter(text_format, datefmt=datefmt)
    handler.setFormatter(formatter)
    if regions:
        handler.addFilter(RegionFilter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler
