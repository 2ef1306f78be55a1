"""Smoke test of bench.dispatch_cost (#21, #27): it runs end to end without valgrind, with
a few messages, through every variant, old layout and new, and prints the table. Figures
are never asserted (they belong to bench runs); that each variant ran its own tree and got
the right decision is (the child checks it). Not an integration test: no broker."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("old", "new", "new without middleware", "new without Workflows", "new without feature scopes",
            "new + no-op scopes")


def test_dispatch_cost_runs_every_variant_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run = subprocess.run([sys.executable, "-m", "bench.dispatch_cost", "--no-callgrind", "--messages", "20",
                          "--rounds", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0][0] == "| variant"
    assert [(row[0].strip("| "), row[1]) for row in rows[1:]] == [
        (variant, kind) for variant in VARIANTS for kind in ("call", "cast")]
    for row in rows[1:]:
        assert row[2] == "-" and float(row[4]) > 0, row  # no instructions without callgrind; CPU time always
    assert out.exists()


def test_an_unknown_variant_is_a_usage_error() -> None:
    run = subprocess.run([sys.executable, "-m", "bench.dispatch_cost", "--only", "nwe"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "unknown variant 'nwe'" in run.stderr
