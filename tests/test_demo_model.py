"""The embedded demo model: its held-out loss, recomputed from the shipped checkpoint, is the README's figure and
at least 1 nat per token below the unigram baseline; the sampler runs it by default."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import pytest

import qwen_jax
from qwen_jax.chat import ChatTokenizer
from qwen_jax.sample import DEMO_MODEL
from qwen_jax.train.data import load_documents, split_documents
from qwen_jax.train.evaluate import held_out_loss, unigram_baseline
from qwen_jax.train.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_held_out_loss_is_the_readme_figure_and_beats_unigram_by_a_nat():
    recipe = load_recipe(REPO / "configs" / "demo-train.json")
    model = qwen_jax.load(DEMO_MODEL, dtype=jnp.float32)
    tokenizer = ChatTokenizer(DEMO_MODEL)
    train, held = split_documents(load_documents(recipe.data, recipe.delimiter), recipe.held_out_fraction)
    assert len(held) >= 10 and not {d["text"] for d in held} & {d["text"] for d in train}  # split by document
    loss, tokens = held_out_loss(model.params, model.config.text, held, tokenizer, recipe.seq_len, recipe.batch_size)
    unigram = unigram_baseline(train, held, tokenizer, recipe.seq_len, model.config.text.vocab_size)
    assert loss <= unigram - 1.0, (loss, unigram)
    readme = (REPO / "README.md").read_text()
    found = re.search(r"held-out loss \*\*([0-9.]+)\*\* nats/token .* unigram baseline ([0-9.]+)", readme, re.S)
    assert found, "the README states the demo model's held-out loss"
    assert abs(float(found.group(1)) - loss) <= 5e-4 and abs(float(found.group(2)) - unigram) <= 5e-4
    assert f"{tokens:,}" in readme


def test_demo_model_is_small_and_ships_in_the_package():
    size = sum(f.stat().st_size for f in DEMO_MODEL.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, size
    assert DEMO_MODEL.parent == Path(qwen_jax.__file__).parent


def test_committed_demo_tokenizer_is_what_the_tool_builds(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "tools" / "build_tokenizer.py"), str(tmp_path), "--vocab-size",
                          "4096"], capture_output=True, text=True, check=False, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "demo_tokenizer" / name).read_bytes(), name
        assert (DEMO_MODEL / name).read_bytes() == (REPO / "data" / "demo_tokenizer" / name).read_bytes(), name
