"""What a user imports: every exception from ``amqprpc`` (and from where it used to live),
the call being handled through ``current_call()``, one version."""
from __future__ import annotations

import ast
import configparser
import inspect
from pathlib import Path

import pytest

import amqprpc
from amqprpc import errors

ROOT = Path(__file__).resolve().parents[2]


def test_every_exception_a_caller_catches_lives_in_errors_and_is_exported():
    defined = {name for name, obj in vars(errors).items() if inspect.isclass(obj) and issubclass(obj, Exception)
               and obj.__module__ == errors.__name__}
    internal = {"BadMessage"}  # the worker turns it into an error reply; never raised to a user
    assert defined - internal <= set(amqprpc.__all__)
    for name in defined - internal:
        assert getattr(amqprpc, name) is getattr(errors, name)


@pytest.mark.parametrize("module, name", [
    ("amqprpc.ops.loading", "ServiceNotFound"), ("amqprpc.wire.topology", "TopologyMismatch"),
    ("amqprpc.ops.daemon", "StartupError"), ("amqprpc.ops.pidfile", "PidFileError"), ("amqprpc.server.worker", "ReplyTooLarge"),
    ("amqprpc.transport.ioloop", "StartCancelled"),
])
def test_old_import_paths_still_work(module, name):
    imported = __import__(module, fromlist=[name])
    assert getattr(imported, name) is getattr(errors, name)


def test_no_other_module_defines_a_public_exception():
    """A new error a user may catch goes into errors.py (private helpers may stay where used)."""
    allowed = {"link.py": {"LinkDead"}, "framereader.py": {"Idle", "LinkClosed"}, "demo.py": {"DemoUnavailable"}}
    found = {}
    for path in (ROOT / "amqprpc").glob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and any(
                    getattr(base, "id", getattr(base, "attr", "")).endswith(("Exception", "Error"))
                    for base in node.bases):
                if node.name not in allowed.get(path.name, set()):
                    found.setdefault(path.name, []).append(node.name)
    assert not found, f"exceptions outside errors.py: {found}"


def test_current_call_is_none_outside_a_handler():
    assert amqprpc.current_call() is None


def test_current_call_reports_the_request_and_what_is_left_of_its_deadline():
    import time

    from amqprpc.context import CallContext, current

    token = current.set(CallContext("svc", "get_user", "c-1", "t-1", time.time() + 5))
    try:
        call = amqprpc.current_call()
        assert (call.service, call.action, call.correlation_id, call.trace_id) == ("svc", "get_user", "c-1", "t-1")
        assert 4 < call.remaining() <= 5
    finally:
        current.reset(token)
    assert amqprpc.current_call() is None


def test_the_version_is_written_once():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["version"] == "attr: amqprpc.version.__version__"
    assert amqprpc.__version__.count(".") == 2


def test_the_library_does_not_import_its_example():
    """workers/ is the shop built *with* amqprpc: amqprpc finds it by name (loading's fallback)
    or through entry points (the demo), never by an import statement."""
    importers = []
    for path in (ROOT / "amqprpc").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(name == "workers" or name.startswith("workers.") for name in names):
                importers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not importers, f"amqprpc imports workers: {importers}"


def test_the_shop_modules_do_not_import_each_other_back():
    """shop.py holds what the services share; the services import it, not the reverse."""
    tree = ast.parse((ROOT / "workers" / "shop.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.endswith("_service") for name in imported)
    assert not any(node.level for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))


def test_the_architecture_layout_names_every_module():
    readme = (ROOT / "docs" / "architecture.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n```\n", layout.index("```text")) + 4]
    package = ROOT / "amqprpc"
    modules = {path.name for path in package.rglob("*.py")} - {"__init__.py", "__main__.py"}
    folders = {f"{init.parent.name}/" for init in package.glob("*/__init__.py")}
    missing = sorted(name for name in modules | folders if name not in layout)
    assert not missing, f"docs/architecture.md's Layout does not name: {missing}"
