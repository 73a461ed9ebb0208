"""The benchmark scripts run end to end on tiny sizes and print their tables and closing ratio.

Smoke runs only: speed is measured by running the scripts (README.md), never asserted here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_training_benchmark_prints_the_ratio_last():
    out = _run("training.py", "--quick", "--rounds", "1")
    assert "| project |" in out and "| minimal |" in out
    assert re.search(r"ratio project/minimal samples/s \(cpu, baseline, eager\): \d+\.\d+\s*$", out)


def test_pruning_benchmark_runs_the_same_sequence_under_each_pruner():
    out = _run("pruning.py", "--quick", "--seeds", "0")
    rows = [line for line in out.splitlines() if line.startswith("| 0 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["none", "median", "hyperband"]
    for row in rows:  # a trial that survives pruning ends with its unpruned value
        same, total = row.split("|")[9].strip().split("/")
        assert same == total
    assert out.rstrip().splitlines()[-1].startswith("ratio with/without pruning (1 seed")


@pytest.mark.postgres
def test_workers_benchmark_reports_scaling_and_overhead(pg_url: str):
    # the script makes its own PostgreSQL database; the fixture only makes sure a server answers
    out = _run("workers.py", "--workers", "1", "2", "--per-worker", "2", "--seconds", "0.05",
               "--overhead-trials", "5", "--overhead-rounds", "1")
    for storage in ("postgresql", "sqlite"):
        assert re.search(rf"\| {storage} \| 2 \| [\d.]+ \| \d+% \|", out), out
        assert re.search(rf"\| {storage} \|( [\d.]+ ms \|){{3}} [\d.]+x \| [\d.]+x \|", out), out


def test_samplers_benchmark_compares_samplers_and_times_asks():
    out = _run("samplers.py", "--quick", "--seeds", "1", "--ask-sizes", "10")
    assert "| 10 | cycle |" in out and "| 10 | tpe |" in out
