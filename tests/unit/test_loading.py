"""``--app`` as ``celery -A`` and ``uvicorn`` have it: imported from the current folder, and
every way it can fail is one line and exit 2 (a usage error Supervisor and systemd do not
retry); entry points on every supported Python."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from amqprpc.ops.loading import ServiceNotFound, known_services, load_service
from amqprpc.testing import unique_name

SHOP = ["inventory-service", "notification-service", "order-service", "payment-service", "user-service"]


def test_the_shop_is_found_in_the_checkout_and_not_installed():
    """workers/ is not in the wheel (a top-level ``workers`` would collide with a user's own)
    and registers no entry point; the checkout's copy is found by name."""
    from importlib import metadata

    assert set(SHOP) <= set(known_services())
    found = metadata.entry_points()
    group = found.select(group="amqprpc.services") if hasattr(found, "select") else found.get("amqprpc.services", [])
    assert not [entry for entry in group if entry.value.startswith("workers.")]  # (3.9: a dict of groups)
    assert "workers" not in (metadata.distribution("amqprpc").read_text("top_level.txt") or "").split()


@pytest.fixture
def app_folder(tmp_path, monkeypatch):
    """A folder holding ``<package>/users.py`` (a Service named ``user-service``), made the
    current folder; the package name is unique so no earlier import is reused."""
    package = unique_name("myshop").replace("-", "_")
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "users.py").write_text(
        "from amqprpc import Service\nservice = Service('user-service')\n"
        "broken = None\n")
    (tmp_path / package / "boom.py").write_text("x = 1\nraise RuntimeError('no database configured')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    yield package
    for name in [name for name in sys.modules if name == package or name.startswith(package + ".")]:
        del sys.modules[name]


def test_app_is_imported_from_the_current_folder(app_folder):
    assert load_service("user-service", app=f"{app_folder}.users:service").name == "user-service"


@pytest.mark.parametrize("ref, says", [
    ("{p}.nothing:service", "no module '{p}.nothing' in "),
    ("nopackage_xyz.users:service", "no module 'nopackage_xyz' in "),
    ("{p}.boom:service", "importing {p}.boom failed: RuntimeError: no database configured ("),
    ("{p}.users:servic", "{p}.users:servic is nothing, not an amqprpc.Service"),
    ("{p}.users:Service", "is a type, not an amqprpc.Service"),
    ("{p}.users:service", "--app {p}.users:service is the service 'user-service', not 'order-service'"),
])
def test_every_failure_says_what_went_wrong(app_folder, ref, says):
    ref, says = ref.format(p=app_folder), says.format(p=app_folder)
    with pytest.raises(ServiceNotFound) as failure:
        load_service("order-service", app=ref)
    assert says in str(failure.value)


def installed_worker(folder, *args: str) -> subprocess.CompletedProcess:
    """The installed ``amqprpc`` command (not ``python -m``, which would put the current
    folder on the path itself), run in ``folder``, with no broker (127.0.0.1:1) and no wait."""
    command = os.path.join(os.path.dirname(sys.executable), "amqprpc")
    return subprocess.run([command, "worker", *args, "--broker", "amqp://guest:guest@127.0.0.1:1//",
                           "--broker-wait", "0", "--registry-interval", "0"],
                          capture_output=True, text=True, timeout=60, cwd=folder, env={**os.environ, "PYTHONPATH": ""})


def test_the_installed_command_imports_app_from_the_current_folder(tmp_path):
    (tmp_path / "good_app.py").write_text("from amqprpc import Service\nservice = Service('good-service')\n")
    result = installed_worker(tmp_path, "good-service", "--app", "good_app:service")
    assert result.returncode == 4, result.stderr  # loaded; then no broker at 127.0.0.1:1
    assert "cannot connect to broker" in result.stderr


def test_cli_app_failure_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "broken_app.py").write_text("import no_such_dependency_xyz\n")
    result = installed_worker(tmp_path, "x", "--app", "broken_app:service")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: --app broken_app:service: importing broken_app failed: ModuleNotFoundError: "
                           "No module named 'no_such_dependency_xyz' (")
    assert "broken_app.py:1)" in line
