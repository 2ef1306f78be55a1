"""Middleware that switches itself on when the application set up what it reports to.

OpenTelemetry (:mod:`amqprpc.middleware.otel`): when an SDK tracer or meter provider is the global one
as a worker or client is made (``opentelemetry-instrument`` sets them from ``OTEL_*``
variables before the program runs; an application sets them at start-up, before it makes
clients), unless ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` names ``amqprpc``. Otherwise -- no
opentelemetry, the API alone, or the API imported by another library (redis 8 imports it) --
no hook is added and nothing is imported: the messages pay nothing. Workers and clients call
:func:`automatic` when they resolve their middleware.
"""
from __future__ import annotations

import sys
from typing import Sequence

from amqprpc import middleware


def automatic(given: Sequence[middleware.Middleware] = ()) -> list[middleware.Middleware]:
    """The middleware to add by itself to a worker or client that has ``given`` besides
    the process's defaults: OpenTelemetry's unless one is there already."""
    if not _otel_configured():
        return []
    try:
        from amqprpc.middleware import otel
    except ImportError:  # an opentelemetry-api too old for it: run untraced
        return []
    present = [*middleware.default, *given]
    if otel.disabled() or any(isinstance(each, otel.OpenTelemetryMiddleware) for each in present):
        return []
    return [otel.default_middleware()]


def _otel_configured() -> bool:
    """An SDK's tracer or meter provider is the global one (not the API's proxy or no-op,
    which live in the API's own modules). Imports nothing: without ``opentelemetry`` already
    imported, nobody configured it."""
    for name, getter in (("opentelemetry.trace", "get_tracer_provider"),
                         ("opentelemetry.metrics", "get_meter_provider")):
        api = sys.modules.get(name)
        if api is None:
            continue
        try:
            provider = getattr(api, getter)()
        except Exception:  # noqa: BLE001 - a broken OTEL_PYTHON_*_PROVIDER setting is not ours to fail on
            continue
        if not type(provider).__module__.startswith(name):
            return True
    return False
