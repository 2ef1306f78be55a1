"""structlog, configured once per process: JSON for machines, console for people.

Every line carries the process-wide fields (``service``) bound with :func:`bind_process`
and the per-request fields (``action``, ``correlation_id``, ``trace_id``) bound in the
handler thread's contextvars. Every string value passes through :func:`config.redact`
so that a broker password can never reach a log line, whatever put it there.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from .config import redact

LEVELS = ("debug", "info", "warning", "error", "critical")
_process_fields: dict[str, Any] = {}
_configured = False


def bind_process(**fields: Any) -> None:
    """Fields added to every line of this process (all threads), e.g. ``service``."""
    _process_fields.update(fields)


def _add_process_fields(_, __, event_dict: dict) -> dict:
    for key, value in _process_fields.items():
        event_dict.setdefault(key, value)
    return event_dict


def _redact_values(_, __, event_dict: dict) -> dict:
    for key, value in event_dict.items():
        if isinstance(value, str) and "@" in value:
            event_dict[key] = redact(value)
    return event_dict


def configure(fmt: str = "console", level: str = "info", stream=None) -> None:
    """Configure structlog and the stdlib root logger (kombu and py-amqp log through it).

    ``fmt`` is ``json`` or ``console``; ``level`` one of :data:`LEVELS`.
    """
    global _configured
    level_no = getattr(logging, level.upper())
    stream = stream or sys.stderr
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_process_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_values,
            renderer,
        ],
        # A filtering logger turns disabled levels into no-ops: per-request debug lines
        # cost nothing when the level is above debug.
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Libraries' own (stdlib) warnings go to the same stream, passwords redacted too.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(max(level_no, logging.WARNING))
    _configured = True


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


bind_request = structlog.contextvars.bind_contextvars
clear_request = structlog.contextvars.clear_contextvars
