"""Smoke test of the benchmark: it runs end to end with tiny counts and writes every
figure and ratio. Timings are never asserted (they belong to bench runs, not tests)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("sequential", "pipelined_32", "threads_8", "casts")


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
        assert set(results[scenario]["ratio"]) == {"per_s", "p50_ms", "p99_ms", "mean_ms"}
    assert results["rss"]["calls"] == 200
    for process in ("worker", "client", "raw_server"):
        assert {"before_mb", "after_mb", "growth_mb"} <= set(results["rss"][process])
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["cpu"]
    for label in ("sequential calls/s", "32 in flight calls/s", "8 threads calls/s", "casts/s", "RSS over 200 calls"):
        assert label in run.stdout  # the printed table has every scenario's row
