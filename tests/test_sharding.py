"""Sharded models on 8 simulated CPU devices (in a subprocess, so the device count is set before jax starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_jax.errors import InputError
from qwen_jax.mesh_spec import parse_mesh_spec

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "sharded_equivalence.py"
MOE_FAMILIES = ["qwen3_5_moe_fused", "qwen3_next", "qwen3_vl_moe"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", MOE_FAMILIES)  # one subprocess each, so the test workers share them out
def test_sharded_logits_and_tokens_equal_single_device(built_models, family):
    directory = str(built_models(family).converted_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(SCRIPT), directory], capture_output=True, text=True, timeout=550,
                            env=env)  # fmt: skip
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert len(lines) == 3  # the three meshes
    for line in lines:
        assert line["max_abs_diff"] <= line["tolerance"] and line["tokens_equal"] and line["experts_split"], line
        assert line["bytes_deviation"] <= 0.10, line


def test_mesh_spec_errors():
    assert parse_mesh_spec("data=2, expert=4") == {"data": 2, "expert": 4}
    for bad, message in [("model=2", "unknown"), ("data=x", "integer"), ("data=2,data=2", "twice"), ("data=0", ">= 1")]:
        with pytest.raises(InputError, match=message):
            parse_mesh_spec(bad)


def test_experts_not_dividing_the_expert_axis_is_an_error():
    from qwen_jax.sharding import spec_for

    class FakeMesh:
        shape = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 3}

    with pytest.raises(InputError, match="4 experts do not divide the expert axis of size 3"):
        spec_for((4, 8, 16), ("expert", "embed", None), FakeMesh(), "gate_up_proj")
    # Other dimensions that do not divide are replicated instead.
    assert tuple(spec_for((5, 8), ("q_heads", None), type("M", (), {"shape": {"tensor": 2}})(), "q")) == (None, None)


def test_multi_process_detection(monkeypatch):
    from qwen_jax import runtime

    for name in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE", "MEGASCALE_NUM_SLICES", "TPU_WORKER_HOSTNAMES"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert not runtime.is_multi_process()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0")
    assert not runtime.is_multi_process()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert runtime.is_multi_process()
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert runtime.is_multi_process()
    # A launcher variable or cache setting that is not a number is bad input, named in one line.
    monkeypatch.setenv("SLURM_NTASKS", "four")
    with pytest.raises(InputError, match="SLURM_NTASKS='four' is not an integer"):
        runtime.is_multi_process()
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "soon")
    with pytest.raises(InputError, match="JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='soon' is not a number"):
        runtime.setup()
