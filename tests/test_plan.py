"""`python -m qwen_jax.plan`: per-device memory from shapes and shardings equals what a loaded model and the real
generation prefill hold on the same 8-device mesh (in a subprocess, so the device count is set before jax starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "plan_check.py"


def _run_script(directory: Path, mesh: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(SCRIPT), str(directory), mesh], capture_output=True, text=True,
                            timeout=550, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))


@pytest.mark.timeout(600)
def test_plan_memory_equals_what_a_sharded_model_holds(built_models):
    out = _run_script(built_models("qwen3_5_moe_fused").converted_dir, "data=2,expert=4")
    report, measured = out["report"], out["measured"]
    # Exact: both are bytes of the same shapes under the same shardings (the batch of 3 padded to 4 rows).
    assert report["batch"] == 4 and report["devices"] == 8
    assert report["per_device_bytes"]["params"] == measured["params"], out
    assert report["per_device_bytes"]["cache"] == measured["cache"], out
    tokens = report["per_token_per_device"]
    assert all(tokens[k] > 0 for k in ("prefill_flops", "prefill_bytes", "decode_flops", "decode_bytes")), tokens
    assert report["compile_s"]["prefill"] > 0 and report["compile_s"]["decode"] > 0
    assert "data=2,expert=4" in out["text"] and "parameters" in out["text"]


def test_plan_flops_per_token_match_the_configs_arithmetic():
    """On one device, the compiled decode step's FLOPs per token are those of the active parameters (2 per weight
    a token meets) plus the token mixers and elementwise work: between 1x and 1.3x of `2 x active parameters` for a
    published MoE config, where matmuls dominate. Guards the loop-free scaling (a segment counted once instead of
    `count` times gives a fraction of it)."""
    import jax
    import jax.numpy as jnp

    from qwen_jax.config import load_config
    from qwen_jax.costs import token_parameters
    from qwen_jax.plan import CONFIG_DIR, Planner
    from qwen_jax.sharding import make_mesh

    config = load_config(CONFIG_DIR / "qwen3.5-35b-a3b.json").text
    planner = Planner(config, make_mesh("data=1", jax.devices()[:1]), 1, 64, jnp.bfloat16)
    decode = planner.cost_per_token(32)["decode"]["flops"]
    active = token_parameters(config).active
    assert 1.0 <= decode / (2 * active) <= 1.3, (decode, 2 * active)


def test_plan_command_line_errors(capsys):
    from qwen_jax.plan import main

    assert main(["--config", "no-such-model", "--mesh", "data=2"]) == 1
    assert "no config 'no-such-model'" in capsys.readouterr().err
    assert main(["--config", "qwen3.5-0.8b", "--mesh", "model=2"]) == 1
    assert "mesh axis 'model' unknown" in capsys.readouterr().err
    # jax has started in this process with one device, so a larger mesh cannot be simulated.
    assert main(["--config", "qwen3.5-0.8b", "--mesh", "fsdp=64"]) == 1
    assert "needs 64 devices" in capsys.readouterr().err
    for bad, message in [(["--context", "1"], "--context must be >= 2"), (["--prefill-chunk", "48"], "power of two")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", "qwen3.5-0.8b", "--mesh", "data=1", *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_readme_plan_command_for_the_397b_model():
    """The README's planner command (Qwen3.5-397B-A17B on 64 simulated devices, expert=64): it runs, and its
    per-device parameter bytes are the experts (and the router's columns) split 64 ways plus everything else whole (bfloat16; A_log, dt_bias
    and norm weights float32), counted here from the parameter shapes."""
    import math

    import jax
    import jax.numpy as jnp

    from qwen_jax.checkpoint.hf_mapping import keeps_float32
    from qwen_jax.config import load_config
    from qwen_jax.model import param_shapes
    from qwen_jax.plan import CONFIG_DIR
    from qwen_jax.vision import vision_param_shapes

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "qwen_jax.plan", "--config", "qwen3.5-397b-a17b", "--mesh", "expert=64",
                          "--batch", "8", "--context", "32768", "--json"], capture_output=True, text=True, timeout=550,
                         env=env, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["devices"] == 64 and report["mesh"]["expert"] == 64
    config = load_config(CONFIG_DIR / "qwen3.5-397b-a17b.json")
    tree = dict(param_shapes(config.text), visual=vision_param_shapes(config.vision))
    expected = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        size = math.prod(leaf.shape) * (4 if keeps_float32(name) else jnp.dtype(jnp.bfloat16).itemsize)
        split = "/experts/" in name or name.endswith("mlp/gate/kernel")  # experts, and the router's expert columns
        expected += size // 64 if split else size
    assert report["per_device_bytes"]["params"] == expected
