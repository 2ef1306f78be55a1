"""Smoke test of the benchmark: it runs end to end with tiny counts and writes every
figure and ratio. Timings are never asserted (they belong to bench runs, not tests)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("sequential", "pipelined_32", "threads_8", "aio_32", "casts", "payload_1k", "payload_64k", "payload_1m",
             "workers_1", "workers_2", "workers_3", "workers_4")


def test_bench_with_tiny_counts_writes_every_figure_and_ratio(tmp_path, broker_url):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", "--scale", "0.002", "--rounds", "2", "--rss-calls", "200",
                          "--broker-url", broker_url, "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    results = doc["results"]
    for scenario in SCENARIOS:
        for side in ("amqprpc", "raw"):
            figures = results[scenario][side]
            assert figures["count"] > 0 and figures["errors"] == 0, (scenario, side, figures)
            for key in ("per_s", "p50_ms", "p99_ms", "mean_ms"):
                assert figures[key] > 0, (scenario, side, key)
        assert {"per_s", "p50_ms", "p99_ms", "mean_ms"} <= set(results[scenario]["ratio"])
    for size in ("1k", "64k", "1m"):
        payload = results[f"payload_{size}"]
        assert payload["amqprpc"]["mb_per_s"] > 0 and payload["raw"]["mb_per_s"] > 0 and payload["ratio"]["mb_per_s"]
    assert results["payload_1m"]["body_bytes"] > 1_000_000
    assert results["rss"]["calls"] == 200
    for process in ("worker", "client", "raw_server"):
        assert {"before_mb", "after_mb", "growth_mb"} <= set(results["rss"][process])
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["cpu"]
    for label in ("sequential calls/s", "32 in flight calls/s", "8 threads calls/s", "AsyncRpcClient 32 in flight",
                  "casts/s", "1 MB payload MB/s", "4 processes calls/s", "RSS over 200 calls"):
        assert label in run.stdout  # the printed table has every scenario's row


def test_only_runs_the_chosen_scenarios_and_groups(tmp_path, broker_url):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", "--scale", "0.001", "--rounds", "2", "--only",
                          "sequential,payloads", "--skip", "payload_1m", "--broker-url", broker_url, "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert list(json.loads(out.read_text())["results"]) == ["sequential", "payload_1k", "payload_64k"]


def test_an_unknown_scenario_is_a_usage_error():
    run = subprocess.run([sys.executable, "-m", "bench", "--only", "sequentail"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 2 and "unknown scenario 'sequentail'" in run.stderr
