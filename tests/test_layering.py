"""Dependencies go one way -- wire <- connection loop <- client / worker <- operations <- CLI --
with no import cycle, and ``import amqprpc`` loads no optional dependency.

Read from the source (every ``import`` statement, those inside functions too: a lazy import
is still a dependency), not from what happens to be imported, so a cycle cannot hide
behind an import order that works today."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import amqprpc

PACKAGE = pathlib.Path(amqprpc.__file__).parent

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS = [
    # foundations: no amqprpc imports beyond this layer
    {"errors", "config", "logs", "ids", "version", "outcome", "backoff", "context", "sdnotify", "pidfile",
     "framereader", "framewriter", "contracts"},
    # wire and definitions: envelope, topology, frames; a service's handlers; hooks
    {"envelope", "topology", "framehandler", "link", "retry", "service", "middleware", "deadlines"},
    # the connection loop and what it carries out
    {"ioloop", "redelivery", "inbox", "consumer"},
    # client and worker
    {"client", "aio", "breaker", "worker", "events", "ping", "shared_client", "responses", "otel", "observability"},
    # operations
    {"daemon", "collector", "dlq", "registry", "metrics", "clientmetrics", "loading", "testing", "demo", "asyncapi"},
    # the command line, and the package's public face
    {"cli", "__main__", "__init__"},
]


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The amqprpc modules ``path`` imports (outside ``if TYPE_CHECKING:`` blocks);
    ``from . import name`` of a name that is not a module is an import of the package."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                 for stmt in block.body for node in ast.walk(stmt)}
    found = set()
    top = 1 if path.parent == PACKAGE else 2  # the level of ``from . import`` / ``from .. import`` naming amqprpc
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and 0 < node.level < top:
            continue  # within its own subpackage (testing/): one module to the layers
        if isinstance(node, ast.ImportFrom) and node.level == top:
            found.update([node.module] if node.module else
                         [alias.name if alias.name in modules else "__init__" for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("amqprpc"):
            rest = node.module.partition(".")[2]
            found.update([rest] if rest else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[2] or "__init__" for alias in node.names
                         if alias.name.split(".")[0] == "amqprpc")
    return {name.split(".")[0] for name in found}


def _files() -> dict[str, list[pathlib.Path]]:
    """Module name -> its source files; a subpackage (``testing/``) is one module of its layer."""
    modules = {path.stem: [path] for path in PACKAGE.glob("*.py")}
    modules.update({init.parent.name: sorted(init.parent.glob("*.py")) for init in PACKAGE.glob("*/__init__.py")})
    return modules


def _graph() -> dict[str, set[str]]:
    files = _files()
    return {name: set().union(*(_imports(path, set(files)) for path in paths)) & files.keys() - {name}
            for name, paths in files.items()}


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert set(_graph()) - placed == set(), "add the new module to a layer in LAYERS"


def test_no_module_imports_a_higher_layer():
    layer_of = {name: index for index, layer in enumerate(LAYERS) for name in layer}
    upward = sorted(f"{name} -> {dep}" for name, deps in _graph().items() for dep in deps
                    if layer_of.get(dep, 0) > layer_of.get(name, 0))
    assert upward == []


def test_there_is_no_import_cycle():
    graph = _graph()
    graph.pop("__init__")  # every submodule's import runs the package first: only its own imports count
    for deps in graph.values():
        deps.discard("__init__")
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_no_submodule_imports_the_package_itself():
    assert sorted(name for name, deps in _graph().items() if "__init__" in deps and name != "__main__") == []


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem not in ("__init__", "__main__"))
    names += sorted(f"{path.parent.name}.{path.stem}" for path in PACKAGE.glob("*/*.py") if path.stem != "__init__")
    subprocess.run([sys.executable, "-c", "import importlib, sys\n"
                    f"for name in {names!r}: importlib.import_module('amqprpc.' + name)"], check=True, timeout=60)


def test_import_amqprpc_loads_neither_prometheus_client_nor_redis():
    subprocess.run([sys.executable, "-c", "import amqprpc, sys; "
                    "assert 'prometheus_client' not in sys.modules and 'redis' not in sys.modules, "
                    "[m for m in ('prometheus_client', 'redis') if m in sys.modules]"], check=True, timeout=60)
