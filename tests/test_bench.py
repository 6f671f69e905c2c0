"""The benchmarks run (at their smoke sizes) and report what they claim to measure; they assert nothing about
speed (tests never do), only that every figure is there, finite, and checked against the reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=550, env=env, cwd=REPO,
                          check=False)  # fmt: skip


@pytest.mark.timeout(600)
def test_side_by_side_benchmark_smoke(tmp_path):
    out = run(["bench/run.py", "--smoke", "--out", str(tmp_path / "run.json")])
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run.json").read_text())
    assert {r["tokens"] for r in results["prefill"]} == {128}
    assert {(r["batch"], r["weights"]) for r in results["decode"]} == {(1, "float32"), (8, "float32"), (1, "bfloat16")}
    assert [r["tokens"] for r in results["delta_rule"]] == [64, 256]
    limits = results["limits"]
    assert limits["matmul_flops_per_s"] > 0 and limits["bandwidth_bytes_per_s"] > 0
    assert limits["matvec_read_bytes_per_s"] > 0 and limits["matvec_bytes"] == limits["copy_bytes"] // 4
    # Both sides computed the same thing: greedy tokens, logits and delta-rule outputs agree.
    checks = results["checks"]
    assert all(v == 1.0 for k, v in checks.items() if k.endswith("token_matches_reference")), checks
    assert all(v >= 0.9 for k, v in checks.items() if k.endswith("tokens_match_reference")), checks  # near-ties
    assert all(v < 1e-3 for k, v in checks.items() if "max_abs" in k), checks
    assert len(results["targets"]) == 7 and all(math.isfinite(t["value"]) for t in results["targets"])
    assert "targets (issue 6)" in out.stdout


def test_bad_arguments_are_one_line():
    out = run(["bench/run.py", "--only", "everything"])
    assert out.returncode == 2 and "unknown part" in out.stderr and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.timeout(300)
def test_planner_and_grouped_matmul_benchmarks_smoke():
    out = run(["bench/plan_models.py", "--smoke"])
    assert out.returncode == 0 and "| tiny-moe | expert=8 |" in out.stdout, out.stderr[-3000:]
    out = run(["bench/grouped_matmul.py", "--rows", "512", "--groups", "8", "--hidden", "64", "--out", "64"])
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["ours_s"] > 0 and result["ragged_dot_s"] > 0 and result["tile"] == 64
