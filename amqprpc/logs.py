"""Logging, as a guest in the application's process.

amqprpc logs through the standard :mod:`logging` module, on loggers named ``amqprpc.*``
(the ``amqprpc`` logger has a ``NullHandler``, as the logging HOWTO asks of libraries):
the application's handlers, formatters and levels decide what is shown and where. A
program that never configured logging sees nothing of amqprpc, on stdout or stderr.

Each record carries its structured fields as attributes, so a JSON formatter or
structlog's ``ProcessorFormatter`` (with ``structlog.stdlib.ExtraAdder()``) can use them:

- ``record.event``: the line's text without fields (``"handler failed"``);
- the request being handled (bound in the handler thread's context with
  :func:`bind_request`): ``service``, ``action``, ``correlation_id``, ``trace_id``,
  ``parent_id``; anything the application bound with structlog's contextvars; the
  process's fields (:func:`bind_process`); the line's own fields;
- ``record.getMessage()`` is the text followed by every field as ``key=value``, for plain
  ``%(message)s`` formatters (``record.msg`` stays a constant template, for grouping).

A field named like a built-in LogRecord attribute (``name``, ``process``, ...) is set as
``amqprpc_<name>``. String values are passed through :func:`config.redact`, so a broker
password never reaches a record whatever put it there.

The ``amqprpc`` command is an application: :func:`configure` sets up the process's
logging for it (structlog JSON or console lines on stderr, redacted, for its own lines,
kombu's, and those of handler code using stdlib logging or structlog). Library code never
calls it.

Cost on the request path: a disabled level costs one ``Logger.isEnabledFor`` (cached by the
logging module), and binding a request's fields sets one ContextVar (a dict), not one per
field as structlog's contextvars would. Structlog users add :func:`add_request_fields` to
their processors to get those fields on their own lines (the ``amqprpc`` command does).
"""
from __future__ import annotations

import contextvars
import logging
import sys
from types import MappingProxyType
from typing import Any, Mapping, MutableMapping

import structlog

from amqprpc.config import redact

EventDict = MutableMapping[str, Any]  # what structlog passes its processors (structlog.typing.EventDict)

LEVELS = ("debug", "info", "warning", "error", "critical")

logging.getLogger("amqprpc").addHandler(logging.NullHandler())

_process_fields: dict[str, Any] = {}
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "event"}
_app_context = structlog.contextvars.get_contextvars
_NOTHING: Mapping[str, Any] = MappingProxyType({})
# The fields of the request this thread (or task) handles. Never mutated: bind sets a new dict.
_request: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("amqprpc_request_fields",
                                                                             default=_NOTHING)


def bind_request(**fields: Any) -> None:
    """Add ``fields`` to every line logged in this thread (or asyncio task) until
    :func:`clear_request`: the worker binds the request's service, action and ids."""
    _request.set({**_request.get(), **fields})


def clear_request() -> None:
    _request.set(_NOTHING)


def add_request_fields(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """A structlog processor: the request's fields on the application's own structlog lines."""
    for key, value in _request.get().items():
        event_dict.setdefault(key, value)
    return event_dict


def bind_process(**fields: Any) -> None:
    """Fields added to every line of this process (all threads), e.g. ``service``."""
    _process_fields.update(fields)


class _Fields:
    """The ``key=value`` text of a record's fields, rendered only if a handler formats it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.fields.items() if value is not None)


class Logger:
    """A stdlib logger that takes structured fields: ``log.info("worker ready", queue=q)``.

    What :func:`get_logger` returns. ``isEnabledFor`` is checked first, so a disabled
    level costs no formatting and no context lookup.
    """

    __slots__ = ("name", "stdlib")

    def __init__(self, name: str):
        self.name = name
        self.stdlib = logging.getLogger(name)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - the logging module's name
        return self.stdlib.isEnabledFor(level)

    def debug(self, event: str, **fields: Any) -> None:
        if self.stdlib.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        if self.stdlib.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        if self.stdlib.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        if self.stdlib.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error line with the exception being handled (its traceback)."""
        if self.stdlib.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, event, fields, exc_info=True)

    def critical(self, event: str, **fields: Any) -> None:
        if self.stdlib.isEnabledFor(logging.CRITICAL):
            self._emit(logging.CRITICAL, event, fields)

    def _emit(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        # The line's own fields first, then the request's, the application's, the process's.
        merged = dict(fields)
        for context in (_request.get(), _app_context(), _process_fields):
            for key, value in context.items():
                merged.setdefault(key, value)
        for key, value in merged.items():
            if isinstance(value, str) and "@" in value:
                merged[key] = redact(value)
        extra = {(f"amqprpc_{key}" if key in _RESERVED else key): value for key, value in merged.items()}
        extra["event"] = event
        args: tuple[Any, ...] = ()
        if merged:
            msg, args = event.replace("%", "%%") + " %s", (_Fields(merged),)
        else:
            msg = event
        # stacklevel 3: the record names the line that called debug()/info()/..., not this one.
        self.stdlib._log(level, msg, args, exc_info=exc_info, extra=extra, stacklevel=3)


def get_logger(name: str) -> Logger:
    """The logger ``name`` (``amqprpc.<module>`` inside amqprpc; any name for handler code)."""
    return Logger(name)


# --- the amqprpc command's own output ----------------------------------------------------
_handler: logging.Handler | None = None
_QUIET_LIBRARIES = ("amqp", "kombu")  # their info lines are connection chatter


def configure(fmt: str = "console", level: str = "info", stream: Any = None) -> None:
    """Set up this process's logging the way the ``amqprpc`` command does: one handler on
    the root logger writing structlog lines (``fmt`` ``json`` or ``console``) to ``stream``
    (stderr), every string value redacted; ``level`` (one of :data:`LEVELS`) for
    amqprpc and the application's loggers, at least ``warning`` for kombu and py-amqp.

    For programs (the CLI, examples, benchmarks), never for library code: it replaces the
    handler an earlier call installed, and configures structlog so that handler code
    using ``structlog.get_logger()`` gets the same lines with the request's fields.
    """
    global _handler
    level_no = getattr(logging, level.upper())
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setLevel(level_no)  # also for loggers someone set lower (a test capturing debug lines)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        # Records of amqprpc's loggers, kombu and stdlib users: their fields are attributes.
        foreign_pre_chain=[_record_fields, structlog.processors.add_log_level, timestamper],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, _redact_values, renderer],
    ))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(level_no)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level_no, logging.WARNING))
    _handler = handler
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_request_fields,
            _add_process_fields,
            structlog.processors.add_log_level,
            timestamper,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """A record as structlog would have it: ``event`` (the text without fields) and every
    field amqprpc (or any ``extra=``) set on it."""
    fields = {key: value for key, value in record.__dict__.items() if key not in _RESERVED}
    fields["event"] = getattr(record, "event", None) or record.getMessage()
    return fields


def _record_fields(_: Any, __: str, event_dict: EventDict) -> EventDict:
    # Like structlog's ExtraAdder, without what another handler's Formatter may have added.
    record = event_dict.get("_record")
    if record is not None:
        event_dict.update(record_fields(record))
    return event_dict


def _add_process_fields(_: Any, __: str, event_dict: EventDict) -> EventDict:
    for key, value in _process_fields.items():
        event_dict.setdefault(key, value)
    return event_dict


def _redact_values(_: Any, __: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if isinstance(value, str) and "@" in value:
            event_dict[key] = redact(value)
    return event_dict
