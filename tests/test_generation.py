"""Generation against the reference: greedy tokens equal `transformers` `generate`, sampling matches the reference
warpers' distributions, penalties equal the reference processors, seeds and stop tokens behave."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import VOCAB
from test_model_parity import RELATIVE_TOLERANCE
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import qwen_jax
from qwen_jax.sampling import SamplingConfig, apply_penalties, sample

NEW_TOKENS = 40


def left_padded_prompts(seed: int, lengths=(5, 130, 260)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.integers(1, VOCAB - 10, n)
        mask[row, width - n :] = 1
    return ids, mask


def reference_greedy(reference, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """The reference's greedy tokens `[batch, new_tokens]`, and per row how many of them a float32 implementation
    must reproduce: up to the first step where the reference's top-2 margin is within 10x the float32 tolerance
    (past a near-tie, rounding may legitimately pick the other token and the continuations diverge)."""
    with torch.no_grad():
        ref = reference.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    scores = torch.stack(ref.scores, 1).float().numpy()  # [batch, steps, vocab]
    top2 = np.sort(scores, axis=-1)[..., -2:]
    near_tie = (top2[..., 1] - top2[..., 0]) <= 10 * RELATIVE_TOLERANCE * np.abs(scores).max(-1)
    cuts = [int(np.argmax(row)) if row.any() else new_tokens for row in near_tie]
    return ref.sequences[:, ids.shape[1] :].numpy(), cuts


@pytest.mark.parametrize("name", ["qwen3_5_moe_per_expert", "qwen3_next", "qwen3_5_dense"])
def test_greedy_tokens_equal_reference(built_models, name):
    built = built_models(name)
    # Seed 0: cut points (moe, next, dense) = [40, 40, 40], [40, 40, 40], [40, 40, 31]: every row compares >= 31.
    ids, mask = left_padded_prompts(seed=0)
    ours = qwen_jax.generate(built.model, ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    ref_tokens, cuts = reference_greedy(built.reference, ids, mask, NEW_TOKENS)
    for row, cut in enumerate(cuts):
        assert cut >= 30, f"row {row}: only {cut} comparable tokens; pick another seed"
        np.testing.assert_array_equal(ours[row, :cut], ref_tokens[row, :cut], err_msg=f"row {row}")


def test_stop_tokens_stop_each_row(built_models):
    model = built_models("qwen3_5_moe_per_expert").model
    ids, mask = left_padded_prompts(seed=4)
    free = qwen_jax.generate(model, ids, mask, max_new_tokens=20, pad_token_id=0)
    stops = [int(free[0, 4]), int(free[2, 9])]
    stopped = qwen_jax.generate(model, ids, mask, max_new_tokens=20, pad_token_id=0, eos_token_id=stops)
    for row in range(3):
        hits = np.flatnonzero(np.isin(free[row], stops))
        end = hits[0] + 1 if len(hits) else 20
        np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == 0).all()
    streamed = np.stack(
        list(qwen_jax.stream(model, ids, mask, max_new_tokens=20, pad_token_id=0, eos_token_id=stops)), 1
    )
    np.testing.assert_array_equal(streamed, stopped[:, : streamed.shape[1]])


def test_seeds(built_models):
    model = built_models("qwen3_5_moe_per_expert").model
    ids, mask = left_padded_prompts(seed=5)
    run = lambda seed: qwen_jax.generate(model, ids, mask, max_new_tokens=12, temperature=1.5, seed=seed)  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def reference_distribution(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    scores = torch.from_numpy(logits[None].astype(np.float32))
    warpers = []
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    if cfg.min_p:
        warpers.append(MinPLogitsWarper(cfg.min_p))
    for w in warpers:
        scores = w(None, scores)
    return torch.softmax(scores, -1)[0].double().numpy()


SAMPLING_CASES = [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=1.0, top_k=4),
    SamplingConfig(temperature=1.0, top_p=0.7),
    SamplingConfig(temperature=1.0, min_p=0.15),
    SamplingConfig(temperature=0.6, top_k=8, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize("cfg", SAMPLING_CASES, ids=lambda c: f"T{c.temperature}-k{c.top_k}-p{c.top_p}-m{c.min_p}")
def test_sampling_matches_reference_warpers(cfg):
    """Chi-squared goodness of fit of 40000 draws to the reference warpers' distribution (p = 0.001 critical
    value), and no draw ever lands on a token the reference removes."""
    logits = np.random.default_rng(0).standard_normal(12).astype(np.float32) * 1.5
    expected = reference_distribution(logits, cfg)
    draws = 40000
    keys = jax.random.split(jax.random.key(123), draws)
    tokens = jax.jit(jax.vmap(lambda k: sample(jnp.asarray(logits)[None], k, cfg)[0]))(keys)
    counts = np.bincount(np.asarray(tokens), minlength=logits.size)
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    expected_counts = draws * expected[support]
    chi2 = (((counts[support] - expected_counts) ** 2) / expected_counts).sum()
    df = max(int(support.sum()) - 1, 1)
    z = 3.09  # one-sided normal quantile for p = 0.001 (Wilson-Hilferty approximation of the chi-squared quantile)
    critical = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    assert chi2 < critical, f"chi2 {chi2:.1f} >= {critical:.1f} with {df} dof"


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_reference_processor(penalty):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 50)).astype(np.float32)
    history = rng.integers(0, 50, size=(2, 17))
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(history), torch.from_numpy(logits.copy()))
    seen = np.zeros((2, 50), bool)
    np.put_along_axis(seen, history, True, axis=1)
    ours = apply_penalties(jnp.asarray(logits), jnp.asarray(seen), jnp.zeros((2, 50), bool),
                           SamplingConfig(repetition_penalty=penalty))  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=1e-6)


def test_presence_penalty_subtracts_once_per_generated_token():
    logits = np.linspace(-2, 2, 10, dtype=np.float32)[None]
    generated = np.zeros((1, 10), bool)
    generated[0, [1, 7]] = True
    ours = apply_penalties(jnp.asarray(logits), jnp.asarray(generated), jnp.asarray(generated),
                           SamplingConfig(presence_penalty=1.5))  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours), logits - 1.5 * generated)


def test_unset_arguments_come_from_generation_config(built_models, tmp_path):
    import shutil

    from qwen_jax.generation import resolve_settings

    directory = tmp_path / "model"
    shutil.copytree(built_models("qwen3_5_moe_per_expert").converted_dir, directory)
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "eos_token_id": [5, 6], "pad_token_id": 1}
    (directory / "generation_config.json").write_text(__import__("json").dumps(gen))
    model = qwen_jax.load(directory)
    settings = resolve_settings(model)
    assert settings.sampling == SamplingConfig(temperature=0.7, top_k=20, top_p=0.8)
    assert settings.stop_tokens == (5, 6) and settings.pad_token_id == 1
    explicit = resolve_settings(model, temperature=0.0, eos_token_id=9, top_k=3)
    assert explicit.sampling == SamplingConfig(temperature=0.0, top_k=3, top_p=0.8)
    assert explicit.stop_tokens == (9,) and explicit.pad_token_id == 1
    (directory / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.7}')
    assert resolve_settings(model).sampling.greedy


def test_right_padded_prompts_generate_as_left_padded(built_models):
    model = built_models("qwen3_5_moe_per_expert").model
    ids, mask = left_padded_prompts(seed=12)
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        right_ids[row, :n], right_mask[row, :n] = ids[row, mask[row] == 1], 1
    left = qwen_jax.generate(model, ids, mask, max_new_tokens=8, pad_token_id=0)
    right = qwen_jax.generate(model, right_ids, right_mask, max_new_tokens=8, pad_token_id=0)
    np.testing.assert_array_equal(left, right)


def test_prefill_chunk_size_does_not_change_tokens(built_models):
    """A 260-token prompt prefilled in pieces of 32 or 64 slots (state carried across) generates what one 512-slot
    piece does."""
    model = built_models("qwen3_5_moe_per_expert").model
    ids, mask = left_padded_prompts(seed=12)
    whole = qwen_jax.generate(model, ids, mask, max_new_tokens=6, pad_token_id=0, prefill_chunk=512)
    for chunk in (32, 64):
        pieces = qwen_jax.generate(model, ids, mask, max_new_tokens=6, pad_token_id=0, prefill_chunk=chunk)
        np.testing.assert_array_equal(pieces, whole)
