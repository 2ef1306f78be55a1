"""Finding a service by name: ``--app``, then the ``amqprpc.services`` entry points, then
the shipped ``workers`` package (DESIGN.md, CLI)."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from .service import Service

ENTRY_POINT_GROUP = "amqprpc.services"


class ServiceNotFound(LookupError):
    pass


def load_service(name: str, app: str | None = None) -> Service:
    """The Service called ``name``. ``app`` (``module:attr``) overrides the lookup."""
    if app:
        return _load_ref(app)
    for entry in _service_entry_points():
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


def known_services() -> list[str]:
    return sorted({entry.name for entry in _service_entry_points()})


def _service_entry_points():
    return entry_points(group=ENTRY_POINT_GROUP)


def _load_ref(ref: str) -> Service:
    module_name, _, attr = ref.partition(":")
    module = importlib.import_module(module_name)
    return _check(getattr(module, attr or "service", None), ref)


def _check(obj, ref: str) -> Service:
    if not isinstance(obj, Service):
        raise ServiceNotFound(f"{ref} is not an amqprpc.Service")
    return obj
