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

# Lowest first. A module may import modules of its own layer or below, never above. Names are
# dotted below amqprpc; a sub-package's __init__ is named by the sub-package ("middleware").
LAYERS = [
    # foundations: no amqprpc imports beyond this layer
    {"errors", "config", "logs", "version", "outcome", "context", "contracts", "wire", "wire.ids",
     "transport.backoff", "transport.framereader", "transport.framewriter", "ops.sdnotify", "ops.pidfile"},
    # wire and definitions: envelope, topology, frames; a service's handlers; hooks
    {"wire.envelope", "wire.topology", "transport.framehandler", "transport.channels", "transport.link", "transport.deadlines", "retry",
     "rate", "schedule", "service", "caller", "middleware", "middleware.view", "workflow", "workflow.canvas", "workflow.state",
     "workflow.runner", "workflow.handle"},
    # the connection loop and what it carries out
    {"transport", "transport.ioloop", "transport.readtoken", "transport.redelivery", "transport.inbox", "transport.consumer"},
    # client and worker, and the middleware they run
    {"client", "client.rpc", "client.connection", "client.aio", "client.breaker", "client.breaker_state", "client.responses", "client.confirms",
     "client.publishing", "client.proxy",
     "server",
     "server.worker", "server.dispatcher", "middleware.workflow", "client.countdown", "client.waiter", "middleware.eta",
     "middleware.ticks", "middleware.ratelimit", "middleware.tasks",
     "server.events", "middleware.ping", "middleware.shared_client", "middleware.otel", "middleware.observability",
     "middleware.redisstate", "middleware.revoke", "middleware.idempotency", "middleware.timelimit"},
    # operations
    {"ops", "ops.daemon", "ops.collector", "ops.dlq", "ops.registry", "middleware.metrics",
     "middleware.clientmetrics", "ops.loading", "ops.demo", "testing", "asyncapi", "ops.actionstats",
     "ops.prefork", "ops.child", "ops.taskcontrol", "ops.beat", "ops.migrate"},
    # the dashboard (amqprpc dashboard): reads the operations' data, serves it over HTTP
    {"dashboard", "dashboard.auth", "dashboard.queues", "dashboard.collect", "dashboard.deadletters",
     "dashboard.app", "dashboard.server"},
    # the command line, and the package's public face
    {"cli", "cli.workflow", "cli.dashboard", "cli.revoke", "cli.taskcontrol", "cli.beat", "__main__", "__init__"},
]


def _name(path: pathlib.Path) -> str:
    """The dotted name below amqprpc of a source file ("__init__" for the package itself)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path, modules: set[str], type_checking: bool = False) -> set[str]:
    """The amqprpc modules ``path`` imports (outside ``if TYPE_CHECKING:`` blocks unless
    ``type_checking``); ``from amqprpc.x import name`` of a name that is not a module is an
    import of ``x`` (of the package itself, "__init__", for ``from amqprpc import name``)."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = set() if type_checking else {
        id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
        and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
        for stmt in block.body for node in ast.walk(stmt)}
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package and package != "__init__" else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "amqprpc":
                module = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:
                child = f"{module}.{alias.name}" if module else alias.name
                found.add(child if child in modules else (module or "__init__"))
        elif isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[2] or "__init__" for alias in node.names
                         if alias.name.split(".")[0] == "amqprpc")
    return found


def _files() -> dict[str, list[pathlib.Path]]:
    """Module name -> its source files; testing/ is one module of its layer."""
    modules: dict[str, list[pathlib.Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _name(path)
        modules.setdefault("testing" if name.startswith("testing") else name, []).append(path)
    return modules


def _graph(type_checking: bool = False) -> dict[str, set[str]]:
    files = _files()
    names = set(files) | {name for paths in files.values() for name in map(_name, paths)}
    graph = {}
    for name, paths in files.items():
        deps = set().union(*(_imports(path, names, type_checking) for path in paths))
        deps = {"testing" if dep.startswith("testing") else dep for dep in deps}
        graph[name] = deps & files.keys() - {name}
    return graph


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert set(_graph()) - placed == set(), "add the new module to a layer in LAYERS"


def test_no_module_imports_a_higher_layer():
    layer_of = {name: index for index, layer in enumerate(LAYERS) for name in layer}
    upward = sorted(f"{name} -> {dep}" for name, deps in _graph().items() for dep in deps
                    if layer_of.get(dep, 0) > layer_of.get(name, 0))
    assert upward == []


def test_there_is_no_import_cycle():
    graph = _graph(type_checking=True)  # an import only the type checker follows is a circle too
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
    names = sorted(name for name in map(_name, PACKAGE.rglob("*.py")) if name not in ("__init__", "__main__"))
    subprocess.run([sys.executable, "-c", "import importlib, sys\n"
                    f"for name in {names!r}: importlib.import_module('amqprpc.' + name)"], check=True, timeout=60)


def test_import_amqprpc_loads_neither_prometheus_client_nor_redis():
    subprocess.run([sys.executable, "-c", "import amqprpc, sys; "
                    "assert 'prometheus_client' not in sys.modules and 'redis' not in sys.modules, "
                    "[m for m in ('prometheus_client', 'redis') if m in sys.modules]"], check=True, timeout=60)


def test_the_package_shows_its_layers():
    """A newcomer meets at most ~20 modules at the top, and sub-packages named for their role."""
    top = sorted(path.stem for path in PACKAGE.glob("*.py"))
    packages = sorted(init.parent.name for init in PACKAGE.glob("*/__init__.py"))
    assert len(top) <= 20, top
    assert len(packages) >= 4, packages
    assert (PACKAGE / "py.typed").exists()



def test_no_module_is_longer_than_one_sitting():
    """At most 500 lines a module (#21): a file a newcomer reads in one sitting."""
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 500}
    assert long == {}, long
