"""Smoke test of ``python -m bench.peers``: with tiny counts it writes every installed peer's
figures beside amqprpc's and raw py-amqp's. The peers (aio-pika, Celery) come with the
``bench`` extra, never with ``test``: without them each peer's case skips."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.peers import PEERS, available

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("peer", PEERS)
def test_a_peer_runs_beside_amqprpc_and_raw(peer, tmp_path, broker_url, monkeypatch):
    if not available(peer):
        pytest.skip(f"{peer} is not installed (pip install -e '.[bench]')")
    out = tmp_path / "peers.json"
    run = subprocess.run([sys.executable, "-m", "bench.peers", "--count", "20", "--rounds", "2", "--peers", peer,
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "AMQPRPC_BROKER_URL": broker_url})
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["peers"] == [peer] and doc["missing"] == []
    for scenario in ("sequential", "pipelined_32"):
        figures = doc["results"][scenario]
        for side in ("amqprpc", "raw", peer):
            assert figures[side]["count"] > 0 and figures[side]["errors"] == 0, (scenario, side, figures[side])
            assert figures[side]["per_s"] > 0
        assert figures["ratio"][peer]["amqprpc_over_peer_per_s"] > 0
    assert peer in run.stdout


def test_a_peer_not_installed_is_skipped_and_named(tmp_path, broker_url, monkeypatch):
    """--peers with nothing importable still runs amqprpc and raw, and says what was missing."""
    from bench import peers

    monkeypatch.setattr(peers, "available", lambda peer: False)
    monkeypatch.setenv("AMQPRPC_BROKER_URL", broker_url)
    doc = peers.main(["--count", "10", "--rounds", "2", "--out", str(tmp_path / "peers.json")])
    assert doc["peers"] == [] and doc["missing"] == sorted(PEERS)
    assert set(doc["results"]["sequential"]) == {"amqprpc", "raw", "ratio"}
