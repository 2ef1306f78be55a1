"""Every code block of the README, of the documentation site (docs/**/*.md) and of
supervisor/README.md and systemd/README.md runs here, against the shipped shop, so the
documentation cannot drift from the code.

How a block runs depends on its fence's info string (the words after the backticks):

- ``python``: written to a file in the work folder and run there by this venv's Python; it
  must exit 0. A python block whose first line is a comment naming a file
  (``# myshop/users.py``) is also saved under that path before any block runs, so that other
  blocks and daemons can import it (``--app myshop.users:service``).
- ``sh`` (or ``bash``): run by ``bash -e -o pipefail`` with this venv's ``bin`` first on PATH
  (so ``amqprpc`` is the venv's); every command must succeed.
- ``sh daemon``: every command line starts a long-running process (a worker, the collector).
  Each must send ``READY=1`` to the ``NOTIFY_SOCKET`` the test gives it (that is: it consumes)
  within 60 s, and must then exit 0 on SIGTERM.
- ``<language> norun: <reason>``: not run; the reason is on the fence, where a reader of the
  Markdown sees it, and pytest reports the block as skipped with it (``pytest -rs``). For what
  cannot run here: ``sudo``, a system-wide install, systemd as PID 1, minutes of load, a
  third-party library shown as the "before" of a migration. Keep them few.
- ``<language> warns: <reason>``: run like the others, but the shop is expected to log a
  warning (a handler refusing on purpose, which its worker logs), so that does not fail it.

The site's build (scripts/mkdocs_hooks.py) cuts ``daemon``, ``norun: ...`` and ``warns: ...``
off the fences before rendering them.
- any other language (``text``, ``json``, ``ini``, ...): not code, not run. A fence without
  a language fails ``test_every_block_says_what_it_is``: say what it is.

Where blocks run: all blocks of one document share a work folder (their current folder) and an
environment pointing at a RabbitMQ node of this test session's own (the ``own_broker``
fixture: other test runs use the shared broker on 5672 at the same time, with the shop's
service names), Redis keys under prefixes of this run (shop state, service registry). The
whole shop of ``workers/`` and a response collector run on that node while blocks run, so a
block can call ``user-service`` or ``submit`` to ``order-service`` as a reader would.

A block that "works" but makes the shop complain fails too: after each block every shop
service is pinged (one handler thread each, so the ping comes after what the block sent), and
any warning or error the shop logged meanwhile (a cast to an action that does not exist, an
event its handler cannot take) fails the block.

Every Markdown file under docs/ is covered as soon as it exists; another document elsewhere is
added to ``DOCUMENTS``. A file two documents save (``# myshop/users.py``) must be the same in both.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from amqprpc import RpcClient, Worker
from amqprpc.ops.collector import Collector
from amqprpc.config import redis_url
from amqprpc.server.events import service_queue_names
from amqprpc.ops.registry import Registry
from amqprpc.client.responses import ResponseStore
from amqprpc.testing import capture_logs, delete_queues, unique_name
from amqprpc.wire.topology import DEFAULT_TOPOLOGY
from workers import build_all
from workers.shop import Shop

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ["README.md", "supervisor/README.md", "systemd/README.md",
             *sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").rglob("*.md"))]
PYTHON, SHELL = {"python", "py"}, {"sh", "bash", "shell"}
BLOCK_TIMEOUT = 120.0  # seconds a block may run; a daemon gets 60 s to be ready
FILE_COMMENT = re.compile(r"#\s*([\w./-]+\.py)\s*$")


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    language: str
    options: str  # the rest of the info string: "daemon", "norun: why", ""
    code: str

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}"

    @property
    def saved_as(self) -> str | None:
        """The file a python block defines (its first line is ``# path.py``), if any."""
        first = self.code.splitlines()[0] if self.code.strip() else ""
        match = FILE_COMMENT.fullmatch(first.strip()) if self.language in PYTHON else None
        return match.group(1) if match else None


def blocks(document: str) -> list[Block]:
    found, opened, code = [], None, []
    for number, line in enumerate((ROOT / document).read_text().splitlines(), 1):
        if opened is None and line.startswith("```"):
            language, _, options = line[3:].strip().partition(" ")
            opened, code = (number, language, options.strip()), []
        elif opened is not None and line.strip() == "```":
            found.append(Block(document, opened[0], opened[1], opened[2], "\n".join(code) + "\n"))
            opened = None
        elif opened is not None:
            code.append(line)
    assert opened is None, f"{document}:{opened[0]}: a fence is never closed"
    return found


ALL_BLOCKS = [block for document in DOCUMENTS for block in blocks(document)]
CODE_BLOCKS = [block for block in ALL_BLOCKS if block.language in PYTHON | SHELL]


def test_every_block_says_what_it_is():
    unlabelled = [block.id for block in ALL_BLOCKS if not block.language]
    assert not unlabelled, f"fences without a language (python, sh, text, ...): {unlabelled}"
    assert len(CODE_BLOCKS) >= 15, "the README lost its examples?"


def test_the_site_is_covered():
    covered = {block.document for block in CODE_BLOCKS}
    assert {"docs/tutorial.md", "docs/guides/services-and-calls.md"} <= covered


def test_a_file_saved_by_several_documents_is_the_same_in_each():
    saved: dict[str, Block] = {}
    for block in ALL_BLOCKS:
        if block.saved_as:
            first = saved.setdefault(block.saved_as, block)
            assert first.code == block.code, f"{block.saved_as}: {first.id} and {block.id} differ"


def test_only_a_few_blocks_are_not_run():
    """norun is for what cannot run here (sudo, systemd, minutes of load); everything else runs."""
    skipped = [block.id for block in CODE_BLOCKS if block.options.startswith("norun:")]
    assert len(skipped) * 4 <= len(CODE_BLOCKS), skipped
    options = {block.options.partition(":")[0] for block in CODE_BLOCKS}
    assert options <= {"", "daemon", "norun", "warns"}, options


@pytest.fixture(scope="module")
def shop_env(own_broker, tmp_path_factory):
    """The shop (every service of workers/) and a collector running on this session's own
    broker, a work folder holding the documents' files, and the environment blocks run in."""
    own_broker.ensure_running()
    folder = tmp_path_factory.mktemp("readme")
    # A reader runs the blocks in a checkout: the shop's workers/ is there, not installed with amqprpc.
    shutil.copytree(ROOT / "workers", folder / "workers")
    for block in ALL_BLOCKS:
        if block.saved_as:
            (folder / block.saved_as).parent.mkdir(parents=True, exist_ok=True)
            (folder / block.saved_as).write_text(block.code)
    prefix = unique_name("amqprpc-readme")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "AMQPRPC_BROKER_URL": own_broker.url, "AMQPRPC_SHOP_PREFIX": f"{prefix}:shop:",
           "AMQPRPC_REGISTRY_PREFIX": f"{prefix}:registry", "AMQPRPC_REGISTRY_INTERVAL": "1"}
    env.pop("PYTHONPATH", None)  # blocks import what a reader's would: the venv's, and their folder's
    services = build_all(Shop(prefix=f"{prefix}:shop:"))
    registry = Registry(prefix=f"{prefix}:registry")
    # One handler thread per service: a ping after a block is handled after what the block sent.
    workers = [Worker(service, broker_url=own_broker.url, concurrency=1, registry=registry, registry_interval=1)
               for service in services]
    collector = Collector(ResponseStore(), broker_url=own_broker.url)
    try:
        for worker in workers:
            worker.start()
        collector.start()
        with RpcClient("readme-test", broker_url=own_broker.url) as client, \
                capture_logs("amqprpc", logging.WARNING) as amqprpc_logged, \
                capture_logs("workers", logging.WARNING) as shop_logged:
            def complaints() -> list[dict]:
                """What the shop warned about since the last call, once it handled what came before."""
                for service in services:
                    client.call(service.name, "ping", timeout=10)
                found = amqprpc_logged + shop_logged
                amqprpc_logged.clear()
                shop_logged.clear()
                return found

            yield folder, env, complaints
    finally:
        for worker in workers:
            worker.shutdown(5)
        collector.shutdown(5)
        names = [DEFAULT_TOPOLOGY.collector_queue]
        for service in services:
            consumed = service_queue_names(service, DEFAULT_TOPOLOGY)
            names += consumed + DEFAULT_TOPOLOGY.retry_queue_names(service.name, consumed)
        delete_queues(*names, broker_url=own_broker.url)
        store = redis.Redis.from_url(redis_url())
        for key in store.scan_iter(f"{prefix}:*"):
            store.delete(key)


@pytest.mark.parametrize("block", CODE_BLOCKS, ids=lambda block: block.id)
def test_block(block: Block, request):
    if block.options.startswith("norun:"):
        pytest.skip(f"{block.id} {block.options}")
    folder, env, complaints = request.getfixturevalue("shop_env")
    complaints()  # nothing of an earlier block counts against this one
    if block.options == "daemon":
        for line in block.code.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                run_daemon(block, line.strip(), folder, env)
        return
    if block.language in PYTHON:
        script = folder / f"readme_block_{block.document.replace('/', '_').replace('.', '_')}_{block.line}.py"
        script.write_text(block.code)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    assert result.returncode == 0, failure(block, f"exit {result.returncode}", result.stdout + result.stderr)
    complained = complaints()
    if not block.options.startswith("warns:"):
        assert not complained, failure(block, "the shop logged warnings", "\n".join(map(str, complained)))


def run_daemon(block: Block, line: str, folder: Path, env: dict) -> None:
    """Start ``line``, wait for its READY=1, stop it with SIGTERM: it must exit 0."""
    address = str(folder / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        if os.path.exists(address):
            os.unlink(address)
        notify.bind(address)
        notify.settimeout(0.5)
        log = folder / "daemon.log"
        with open(log, "w") as output:
            process = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=folder, stdout=output, stderr=output,
                                       env={**env, "NOTIFY_SOCKET": address})
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if "READY=1" in notify.recv(4096).decode().splitlines():
                        break
                except socket.timeout:
                    pass
                assert process.poll() is None, failure(block, f"{line!r} exited {process.returncode}", log.read_text())
                assert time.monotonic() < deadline, failure(block, f"{line!r} not ready within 60 s", log.read_text())
            process.send_signal(signal.SIGTERM)
            code = process.wait(45)
            assert code == 0, failure(block, f"{line!r} exited {code} on SIGTERM", log.read_text())
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def failure(block: Block, what: str, output: str) -> str:
    return f"{block.id}: {what}\n--- block ---\n{block.code}--- output (last 4000 characters) ---\n{output[-4000:]}"
