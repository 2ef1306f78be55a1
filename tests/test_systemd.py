"""The shipped systemd units pass `systemd-analyze verify` (paths templated for this
machine), for an instance of the template per shipped service."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amqprpc.loading import load_service  # noqa: F401 - the services named below must load

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
TEMPLATE = UNITS / "amqprpc-worker@.service"
SHIPPED_SERVICES = sorted(path.stem for path in (ROOT / "supervisor").glob("*.conf"))


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str
    parser.read(path)
    return parser


def test_template_has_what_a_safe_stop_needs():
    service = unit(TEMPLATE)["Service"]
    assert service["Type"] == "notify" and service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure" and service["EnvironmentFile"] == "-/etc/amqprpc/%i.env"
    words = service["ExecStart"].split()
    assert words[1:3] == ["worker", "%i"]
    timeout = float(words[words.index("--shutdown-timeout") + 1]) if "--shutdown-timeout" in words else 30.0
    assert float(service["TimeoutStopSec"]) > timeout
    for hardening in ("NoNewPrivileges", "PrivateTmp"):
        assert service[hardening] == "true"
    assert service["ProtectSystem"] == "strict"
    assert unit(TEMPLATE)["Install"]["WantedBy"] == "amqprpc-shop.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_systemd_analyze_verify(tmp_path):
    text = TEMPLATE.read_text().replace("/opt/amqprpc/venv/bin/amqprpc", str(Path(sys.executable).parent / "amqprpc"))
    (tmp_path / TEMPLATE.name).write_text(text)
    targets = []
    for path in UNITS.glob("*.target"):
        shutil.copy(path, tmp_path / path.name)
        targets.append(tmp_path / path.name)
    instances = []
    for name in SHIPPED_SERVICES:
        instance = tmp_path / f"amqprpc-worker@{name}.service"
        instance.symlink_to(TEMPLATE.name)
        instances.append(instance)
    assert instances and targets
    result = subprocess.run(["systemd-analyze", "verify", *map(str, instances + targets)],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys or bad values are only warnings to verify: none may mention our units.
    assert "amqprpc" not in output, output
