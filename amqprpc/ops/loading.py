"""Finding a service by name: ``--app``, then the ``amqprpc.services`` entry points, then
a module ``workers.<service with - as _>`` (the shop's layout; README, "Run a worker").
That last one is a lookup by name at run time: no amqprpc module imports ``workers``.

``--app module:attr`` imports from the current folder first, as ``celery -A`` and
``uvicorn`` do: ``amqprpc worker user-service --app myshop.users:service`` works from the
folder that holds ``myshop/`` (and under Supervisor's ``directory=`` or systemd's
``WorkingDirectory=``), whether or not that folder is installed.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Iterable

from amqprpc.errors import ServiceNotFound as ServiceNotFound  # re-exported: its home was here
from amqprpc.service import Service

ENTRY_POINT_GROUP = "amqprpc.services"


def load_service(name: str, app: str | None = None) -> Service:
    """The Service called ``name``. ``app`` (``module:attr``) overrides the lookup; the
    service it names must be called ``name`` (or its queue would not be the one asked for)."""
    if app:
        service = load_app(app)
        if service.name != name:
            raise ServiceNotFound(
                f"--app {app} is the service {service.name!r}, not {name!r}: pass {service.name!r} as SERVICE "
                f"(it consumes service.{service.name}.request), or point --app at the Service named {name!r}")
        return service
    for entry in service_entry_points():
        if entry.name == name:
            return _check(entry.load(), entry.value)
    module_name = "workers." + name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name not in (module_name, "workers"):
            raise  # the module exists but one of its imports is missing: say so
        raise ServiceNotFound(
            f"Unknown service {name!r}: no entry point in {ENTRY_POINT_GROUP!r} and no module {module_name!r} "
            f"(use --app module:attribute)") from None
    return _check(getattr(module, "service", None), f"{module_name}:service")


def load_app(ref: str) -> Service:
    """The Service at ``ref`` (``package.module:attribute``, attribute ``service`` by
    default), imported from the current folder first. Any failure is one ServiceNotFound
    line saying what went wrong and where."""
    module_name, _, attr = ref.partition(":")
    if not module_name:
        raise ServiceNotFound(f"--app {ref!r} is not MODULE:ATTRIBUTE (e.g. myshop.users:service)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) and module_name[len(exc.name):][:1] in ("", "."):
            raise ServiceNotFound(f"--app {ref}: no module {exc.name!r} in {cwd} or on the Python path") from None
        raise ServiceNotFound(f"--app {ref}: importing {module_name} failed: {_where(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the app's own import error: one line, with where it happened
        raise ServiceNotFound(f"--app {ref}: importing {module_name} failed: {_where(exc)}") from None
    return _check(getattr(module, attr or "service", None), ref)


def known_services() -> list[str]:
    return sorted({entry.name for entry in service_entry_points()})


def service_entry_points() -> Iterable[EntryPoint]:
    """The ``amqprpc.services`` entry points of every installed package."""
    try:
        return entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python 3.9: no selection by group, a dict of every group instead
        found: Iterable[EntryPoint] = entry_points().get(ENTRY_POINT_GROUP, ())
        return found


def _where(exc: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame an exception came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"SyntaxError: {exc.msg} ({exc.filename}:{exc.lineno})"
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _check(obj: Any, ref: str) -> Service:
    if not isinstance(obj, Service):
        found = "nothing" if obj is None else f"a {type(obj).__name__}"
        raise ServiceNotFound(f"{ref} is {found}, not an amqprpc.Service")
    return obj
