"""The trainer: resume after SIGKILL, gradient accumulation, frozen parameters, the recipe and its command line,
the demo recipe's smoke run. (Gradient and packing parity against the reference: test_train_gradients.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

from qwen_jax.errors import InputError
from qwen_jax.train.recipe import load_recipe, make_recipe

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "data" / "demo_tokenizer"
BOOK = REPO / "data" / "corpus" / "jekyll_and_hyde"


def run(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, *args], check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    """A tiny Qwen3.5-MoE trained from scratch on one book with the demo tokenizer."""
    root = tmp_path_factory.mktemp("recipe")
    config = transformers.Qwen3_5MoeTextConfig(
        vocab_size=4096, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
    )  # fmt: skip
    (root / "model.json").write_text(config.to_json_string())
    recipe = {"model_config": "model.json", "tokenizer": str(TOKENIZER), "data": [str(BOOK)], "seq_len": 64,
              "batch_size": 2, "grad_accum": 2, "steps": 8, "warmup_steps": 2, "learning_rate": 0.01,
              "checkpoint_every": 3, "log_every": 1, "aux_loss_coef": 0.01, "save_dtype": "float32",
              "run_dir": "run", "output": "model"}  # fmt: skip
    (root / "recipe.json").write_text(json.dumps(recipe))
    return root / "recipe.json"


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]


@pytest.mark.timeout(600)
def test_killed_run_resumes_with_the_same_losses(recipe_file, tmp_path):
    whole = run(["-m", "qwen_jax.train", "--config", str(recipe_file), "--no-progress",
                 f"run_dir={tmp_path / 'whole'}", f"output={tmp_path / 'whole-model'}"])  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = losses(tmp_path / "whole")
    assert [s for s, _ in reference] == list(range(1, 9))

    overrides = [f"run_dir={tmp_path / 'killed'}", f"output={tmp_path / 'killed-model'}"]
    killed = run([str(REPO / "tests" / "scripts" / "train_and_die.py"), str(recipe_file), "5", *overrides])
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL after step 5; the last checkpoint is step 3
    assert [s for s, _ in losses(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "killed-model").exists()

    resumed = run(["-m", "qwen_jax.train", "--config", str(recipe_file), "--no-progress", *overrides])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "checkpoints/3" in resumed.stdout, resumed.stdout
    again = losses(tmp_path / "killed")
    assert [s for s, _ in again] == list(range(1, 9))
    for (step, a), (_, b) in zip(reference, again):
        assert abs(a - b) <= 1e-6, (step, a, b)
    # The resumed run's model is the uninterrupted run's.
    import qwen_jax

    ids = np.arange(1, 41)[None]
    np.testing.assert_allclose(np.asarray(qwen_jax.load(tmp_path / "killed-model")(ids)),
                               np.asarray(qwen_jax.load(tmp_path / "whole-model")(ids)), rtol=0, atol=1e-5)  # fmt: skip


def test_gradient_accumulation_equals_one_large_batch(recipe_file):
    """One optimizer step over two micro-batches of 2 rows = one step over the 4 rows together (the cross-entropy
    is normalized by all masked targets of the step; no load-balancing term here, it is per micro-batch)."""
    from qwen_jax.config import load_config
    from qwen_jax.model import init_params
    from qwen_jax.train.optimizer import learning_rate_schedule
    from qwen_jax.train.trainer import LossSettings, TrainState, make_train_step

    config = load_config(recipe_file.parent / "model.json").text
    params = init_params(config, jax.random.key(0))
    schedule = learning_rate_schedule(1e-2, 0, 10, 0.1)
    optimizer = optax.sgd(1.0)  # the update is the gradient itself (Adam's first step is ill-conditioned: g / |g|)
    step = make_train_step(config, optimizer, LossSettings(top_k=2), schedule)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 4000, size=(4, 32)).astype(np.int32)
    segments = np.ones_like(ids)
    segments[1, 20:] = 2
    segments[3, 25:] = 0  # padding
    from qwen_jax.model import segment_positions
    from qwen_jax.train.data import shift_targets

    targets, mask = shift_targets(ids, segments, (segments > 0).astype(np.float32))
    batch = {"input_ids": ids, "segment_ids": segments, "positions": np.asarray(segment_positions(jnp.asarray(segments))),
             "targets": targets, "loss_mask": mask}  # fmt: skip

    def fresh():
        copy = jax.tree.map(jnp.copy, params)  # the step donates its state
        return TrainState(jnp.int32(0), copy, jax.jit(optimizer.init)(copy), jax.random.key_data(jax.random.key(1)))

    one, m1 = step(fresh(), {k: v[None] for k, v in batch.items()})
    two, m2 = step(fresh(), {k: v.reshape(2, 2, -1) for k, v in batch.items()})
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6 * float(m1["loss"])
    assert abs(float(m1["grad_norm"]) - float(m2["grad_norm"])) <= 1e-5 * float(m1["grad_norm"])
    for a, b, p in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), jax.tree.leaves(params)):
        g1, g2 = np.asarray(p) - np.asarray(a), np.asarray(p) - np.asarray(b)
        np.testing.assert_allclose(g2, g1, rtol=0, atol=1e-5 * np.abs(g1).max() + 1e-9)  # f32 sums in another order


def test_frozen_parameters_do_not_move(recipe_file, tmp_path):
    from qwen_jax.train import train

    recipe = load_recipe(recipe_file, [f"run_dir={tmp_path / 'run'}", f"output={tmp_path / 'model'}", "steps=2",
                                       'frozen=["embed_tokens/*", "layers/0/*/linear_attn/A_log"]'])  # fmt: skip
    result = train(recipe, progress=False, log=lambda _: None)
    import qwen_jax
    from qwen_jax.config import load_config
    from qwen_jax.model import init_params
    from qwen_jax.stacking import STACKED

    config = load_config(recipe_file.parent / "model.json").text
    start = init_params(config, jax.random.key(recipe.seed))
    trained = qwen_jax.load(result.output).params
    np.testing.assert_array_equal(np.asarray(trained["embed_tokens"]["embedding"]),
                                  np.asarray(start["embed_tokens"]["embedding"]))  # fmt: skip
    a_log = lambda p: np.asarray(p[STACKED][0][0]["linear_attn"]["A_log"])  # noqa: E731
    np.testing.assert_array_equal(a_log(trained), a_log(start))
    moved = lambda p: np.asarray(p[STACKED][0][0]["linear_attn"]["dt_bias"])  # noqa: E731
    assert np.abs(moved(trained) - moved(start)).max() > 0  # the rest trains
    assert len(result.metrics) == 2 and all(np.isfinite(m["loss"]) for m in result.metrics)


def test_recipe_errors(recipe_file):
    for overrides, message in [
        (["colour=blue"], "unknown recipe key"),
        (["steps=0"], "'steps': must be >= 1"),
        (["steps=ten"], "expected an integer"),
        (["dtype=float16"], "choose one of float32, bfloat16"),
        (["warmup_steps=9"], "must be in [0, steps]"),
        (["init=somewhere"], "exactly one of 'model_config'"),
        (["bad"], "expected key=value"),
    ]:
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_recipe(recipe_file, overrides)
    with pytest.raises(InputError, match="no such recipe file"):
        load_recipe(recipe_file.parent / "missing.json")
    with pytest.raises(InputError, match="missing key"):
        make_recipe({"data": ["x"]})


def test_command_line_errors_are_one_line(recipe_file, tmp_path):
    out = run(["-m", "qwen_jax.train", "--config", str(recipe_file), "steps=0"])
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "error: recipe key 'steps'" in out.stderr
    existing = tmp_path / "exists"
    existing.mkdir()
    out = run(["-m", "qwen_jax.train", "--config", str(recipe_file), f"output={existing}", f"run_dir={tmp_path}/r"])
    assert out.returncode == 1 and "already exists" in out.stderr, out.stderr


@pytest.mark.timeout(600)
def test_demo_recipe_smoke_run_trains_and_samples(tmp_path):
    """CI runs the demo recipe at its smoke size, then samples from what it wrote."""
    out = run(["-m", "qwen_jax.train", "--config", "configs/demo-train.json", "--smoke", "--no-progress",
               f"run_dir={tmp_path / 'run'}", f"output={tmp_path / 'model'}"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out loss" in out.stdout and (tmp_path / "model" / "qwen_jax.json").is_file()
    sample = run(["-m", "qwen_jax.sample", "--ckpt", str(tmp_path / "model"), "--prompt", "The door", "--no-chat",
                  "--max-new-tokens", "8", "--json"])  # fmt: skip
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert len(json.loads(sample.stdout)["tokens"]) == 8
