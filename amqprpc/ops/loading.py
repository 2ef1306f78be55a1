"""Finding a service by name: ``--app``, then the ``amqprpc.services`` entry points, then
a module ``workers.<service with - as _>`` (the shop's layout; README, "Run a worker"),
imported from the current folder first: the shop is not installed with amqprpc (a
top-level ``workers`` package in site-packages would collide with the user's own), it is
found in a checkout. That last one is a lookup by name at run time: no amqprpc module
imports ``workers``.

A service whose import needs an optional dependency that is not installed fails as one
line naming the extra that brings it (``pip install 'amqprpc[pydantic]'``), not a traceback.

``--app module:attr`` imports from the current folder first, as ``celery -A`` and
``uvicorn`` do: ``amqprpc worker user-service --app myshop.users:service`` works from the
folder that holds ``myshop/`` (and under Supervisor's ``directory=`` or systemd's
``WorkingDirectory=``), whether or not that folder is installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
import traceback
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Iterable

from amqprpc.errors import ServiceNotFound as ServiceNotFound  # re-exported: its home was here
from amqprpc.service import Service

ENTRY_POINT_GROUP = "amqprpc.services"
SHOP_PACKAGE = "workers"

# The extra that installs each optional top-level module a service may import.
EXTRAS = {"pydantic": "pydantic", "prometheus_client": "metrics", "setproctitle": "daemon",
          "opentelemetry": "otel", "yaml": "yaml", "orjson": "fast", "fastapi": "web", "uvicorn": "web",
          "wsproto": "web", "flask": "flask"}


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
            try:
                return _check(entry.load(), entry.value)
            except ModuleNotFoundError as exc:
                raise ServiceNotFound(missing_dependency(name, exc)) from None
    module_name = f"{SHOP_PACKAGE}." + name.replace("-", "_")
    _current_folder_first()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name not in (module_name, SHOP_PACKAGE):
            # the module exists but one of its imports is missing: say which, and what installs it
            raise ServiceNotFound(missing_dependency(name, exc)) from None
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
    cwd = _current_folder_first()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) and module_name[len(exc.name):][:1] in ("", "."):
            raise ServiceNotFound(f"--app {ref}: no module {exc.name!r} in {cwd} or on the Python path") from None
        if _extra_of(exc):
            raise ServiceNotFound(f"--app {ref}: {missing_dependency(module_name, exc)}") from None
        raise ServiceNotFound(f"--app {ref}: importing {module_name} failed: {_where(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the app's own import error: one line, with where it happened
        raise ServiceNotFound(f"--app {ref}: importing {module_name} failed: {_where(exc)}") from None
    return _check(getattr(module, attr or "service", None), ref)


def known_services() -> list[str]:
    """The services of the entry points, and of a ``workers`` package in the current folder
    or on the path (a checkout's shop: its ``*_service`` modules)."""
    return sorted({entry.name for entry in service_entry_points()} | set(_shop_services()))


def service_module(name: str) -> str:
    """The module that defines the service ``name`` (not imported): its entry point's, else
    ``workers.<name with - as _>`` (with the current folder on the path)."""
    for entry in service_entry_points():
        if entry.name == name:
            return entry.value.partition(":")[0]
    _current_folder_first()
    return f"{SHOP_PACKAGE}." + name.replace("-", "_")


def missing_dependency(what: str, exc: ModuleNotFoundError) -> str:
    """One line for a service whose import needs a module that is not installed: the extra
    that installs it when amqprpc has one (``pip install 'amqprpc[pydantic]'``)."""
    extra = _extra_of(exc)
    if extra:
        return f"{what} needs {exc.name}, which is not installed: pip install 'amqprpc[{extra}]'"
    return f"{what} needs the module {exc.name!r}, which is not installed ({_where(exc)})"


def _extra_of(exc: ModuleNotFoundError) -> str | None:
    return EXTRAS.get((exc.name or "").partition(".")[0])


def _current_folder_first() -> str:
    """Put the current folder on the import path (as ``python -m`` and ``celery -A`` do) and
    return it: the installed ``amqprpc`` command has its own folder there instead."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return cwd


def _shop_services() -> list[str]:
    _current_folder_first()
    spec = importlib.util.find_spec(SHOP_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [module.name.replace("_", "-") for module in pkgutil.iter_modules(spec.submodule_search_locations)
            if module.name.endswith("_service")]


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
