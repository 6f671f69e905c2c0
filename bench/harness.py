"""The measurements behind `bench/run.py`: qwen-jax and the `transformers` reference (CPU torch) on the same random
weights, float32, plus the machine's own limits.

Every figure is the median of `repeats` timed calls after one warm-up call; for jitted code the warm-up's excess over
the median is reported as its compile time. Decode rates come from two `generate` calls per side that differ only in
the number of new tokens (1 and 1 + `decode_tokens`): their difference is pure decode, prefill and setup cancel.

Threads must be fixed before jax and torch are imported (`bench/run.py` does it); this module imports both.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from tqdm import tqdm
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as reference_moe

import qwen_jax
from qwen_jax.checkpoint.convert import convert
from qwen_jax.config import TextConfig
from qwen_jax.costs import decode_weight_bytes, prefill_flops, token_parameters
from qwen_jax.layers.delta_rule import chunked_gated_delta_rule, default_chunk_size, recurrent_gated_delta_rule

# The model of issue 6: 249M parameters, ~56M active per token; default (partial) rope.
FULL_MODEL = dict(
    vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
    num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256, shared_expert_intermediate_size=512,
)  # fmt: skip
SMOKE_MODEL = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
)  # fmt: skip
# The reference's chunk is its default (64); ours is this backend's default (`default_chunk_size`).
DELTA_HEADS, DELTA_DIM, REFERENCE_DELTA_CHUNK = 8, 64, 64


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What to measure. Prefill lengths are powers of two (each is one prefill piece of `generate`)."""

    model: dict
    prefill: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_tokens: int
    delta: tuple[int, ...]
    matmul: int
    copy_bytes: int
    repeats: int


FULL = Sizes(FULL_MODEL, (512, 2048), (1, 8), 32, 64, (512, 2048, 8192), 4096, 1 << 30, 3)
SMOKE = Sizes(SMOKE_MODEL, (128,), (1, 8), 16, 32, (64, 256), 256, 32 << 20, 2)


class Timing(NamedTuple):
    """Seconds: the warm-up call, the median of the timed calls, all timed calls; and the last call's result."""

    first_s: float
    median_s: float
    runs_s: list[float]
    result: Any


def timed(fn: Callable[[], Any], repeats: int) -> Timing:
    """Call `fn` (which must return only when its work is done) once to warm up, then `repeats` times."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start)
    return Timing(first, statistics.median(runs), runs, result)


def synced(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` that returns only when its jax outputs are computed."""
    return lambda *args, **kwargs: jax.block_until_ready(fn(*args, **kwargs))


class Recorder:
    """Collects the compile times of jitted measurements and the numerical agreement checks."""

    def __init__(self) -> None:
        self.compile_s: dict[str, float] = {}
        self.checks: dict[str, float] = {}

    def compiled(self, name: str, timing: Timing) -> Timing:
        self.compile_s[name] = max(timing.first_s - timing.median_s, 0.0)
        return timing


# --- the machine ---------------------------------------------------------------------------------------------------


def machine_limits(sizes: Sizes) -> dict:
    """float32 matmul rate of one jitted `[n, n] @ [n, n]`, memory bandwidth of a stream over `copy_bytes`, and the
    read rate of XLA's own matrix-vector product over a `copy_bytes / 4` matrix.

    The stream is `x <- x + 1` in place (jitted, the buffer donated): it reads and writes every byte once, 2 x
    `copy_bytes` per call, without the page faults a freshly allocated output would add to each call. The
    matrix-vector product (`[1, 4096] @ [4096, m]`, one unsliced matrix far larger than the caches) is what decode
    at batch 1 does with every weight: its bytes read per second bound any decode built on XLA:CPU's matmuls.
    """
    n = sizes.matmul
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in range(2))
    matmul = timed(lambda: synced(jnp.matmul)(a, b), sizes.repeats)
    del a, b
    stream = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    buffer = [jnp.zeros(sizes.copy_bytes // 4, jnp.float32)]

    def step():
        buffer[0] = stream(buffer[0]).block_until_ready()

    copy = timed(step, sizes.repeats)
    del buffer[0]
    rows = 4096
    matrix = jax.random.normal(jax.random.key(2), (rows, sizes.copy_bytes // 16 // rows), jnp.float32)
    vector = jnp.ones((1, rows), jnp.float32)
    matvec = timed(lambda: synced(jnp.matmul)(vector, matrix), sizes.repeats)
    matrix_bytes = matrix.nbytes
    del matrix
    return {
        "matmul_size": n,
        "matmul_flops_per_s": 2.0 * n**3 / matmul.median_s,
        "matmul_runs_s": matmul.runs_s,
        "copy_bytes": sizes.copy_bytes,
        "bandwidth_bytes_per_s": 2.0 * sizes.copy_bytes / copy.median_s,
        "copy_runs_s": copy.runs_s,
        "matvec_bytes": matrix_bytes,
        "matvec_read_bytes_per_s": matrix_bytes / matvec.median_s,
        "matvec_runs_s": matvec.runs_s,
    }


# --- the models ----------------------------------------------------------------------------------------------------


class Models(NamedTuple):
    reference: torch.nn.Module  # float32, eval mode
    ours: Any  # qwen_jax.Model, float32, the same weights
    ours_bfloat16: Any  # the same directory loaded with bfloat16 weights
    config: TextConfig


def build_models(sizes: Sizes, workdir: Path, seed: int = 0) -> Models:
    """A seeded random reference model, saved, converted and loaded back on our side."""
    torch.manual_seed(seed)
    config = transformers.Qwen3_5MoeTextConfig(**sizes.model)
    reference = transformers.Qwen3_5MoeForCausalLM(config).eval()
    reference.save_pretrained(workdir / "hf")
    convert(workdir / "hf", workdir / "converted", log=lambda _: None)
    ours = qwen_jax.load(workdir / "converted")
    return Models(reference, ours, qwen_jax.load(workdir / "converted", dtype=jnp.bfloat16), ours.config.text)


def our_generate(model: Any, ids: np.ndarray, new_tokens: int, prefill_chunk: int = 256) -> np.ndarray:
    """Greedy `qwen_jax.generate` that never stops early."""
    return qwen_jax.generate(
        model, ids, max_new_tokens=new_tokens, temperature=0.0, eos_token_id=(), pad_token_id=0,
        prefill_chunk=prefill_chunk,
    )  # fmt: skip


def reference_generate(reference: torch.nn.Module, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy `generate` of the reference, with its cache, that never stops early."""
    tokens = torch.from_numpy(ids)
    with torch.inference_mode():
        out = reference.generate(
            tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    return out[:, ids.shape[1] :].numpy()


def reference_logits(reference: torch.nn.Module, ids: np.ndarray, last_only: bool) -> np.ndarray:
    """Reference forward logits `[batch, seq or 1, vocab]`: `logits_to_keep=1` (with its cache, as a prefill) or
    all positions."""
    with torch.inference_mode():
        if last_only:
            out = reference(input_ids=torch.from_numpy(ids), logits_to_keep=1, use_cache=True)
        else:
            out = reference(input_ids=torch.from_numpy(ids), use_cache=False)
    return out.logits.numpy()


def prefill(models: Models, sizes: Sizes, limits: dict | None, record: Recorder, progress: tqdm) -> list[dict]:
    """Prefill tokens/s of one row of each length, logits for the last position only and for all positions.

    Ours, last: `qwen_jax.generate(max_new_tokens=1)` with the whole prompt as one prefill piece (its logits are
    those of the last slot, followed by one greedy pick). Ours, all: `Model.__call__`. Reference: its forward with
    `logits_to_keep=1`, or without a cache for all positions.
    """
    rows = []
    rng = np.random.default_rng(1)
    for seq in sizes.prefill:
        ids = rng.integers(0, models.config.vocab_size, (1, seq), dtype=np.int64)
        for mode in ("last", "all"):
            name = f"prefill_{seq}_{mode}"
            progress.set_postfix_str(name)
            if mode == "last":
                ours = timed(lambda: our_generate(models.ours, ids, 1, prefill_chunk=seq), sizes.repeats)
            else:
                ours = timed(lambda: synced(models.ours)(ids), sizes.repeats)
            record.compiled(name, ours)
            reference = timed(lambda: reference_logits(models.reference, ids, mode == "last"), sizes.repeats)
            if mode == "last":
                record.checks[f"{name}_token_matches_reference"] = float(
                    ours.result[0, 0] == reference.result[0, -1].argmax()
                )
            else:
                record.checks[f"{name}_max_abs_logit_diff"] = float(
                    np.abs(np.asarray(ours.result) - reference.result).max()
                )
            flops = prefill_flops(models.config, seq, 1 if mode == "last" else seq)
            row = {
                "tokens": seq, "logits": mode, "ours_s": ours.median_s, "ours_runs_s": ours.runs_s,
                "reference_s": reference.median_s, "reference_runs_s": reference.runs_s,
                "ours_tokens_per_s": seq / ours.median_s, "reference_tokens_per_s": seq / reference.median_s,
                "ratio": reference.median_s / ours.median_s, "useful_flops": flops,
            }  # fmt: skip
            if limits is not None:
                row["ours_fraction_of_matmul"] = flops / ours.median_s / limits["matmul_flops_per_s"]
                row["reference_fraction_of_matmul"] = flops / reference.median_s / limits["matmul_flops_per_s"]
            rows.append(row)
            progress.update()
    return rows


def _decode_seconds(generate: Callable[[int], Any], sizes: Sizes) -> tuple[Timing, Timing]:
    return timed(lambda: generate(1), sizes.repeats), timed(lambda: generate(1 + sizes.decode_tokens), sizes.repeats)


def decode(models: Models, sizes: Sizes, limits: dict | None, record: Recorder, progress: tqdm) -> list[dict]:
    """Decode tokens/s (all rows together) at each batch size, float32 on both sides; then ours at batch 1 with
    bfloat16 weights (float32 delta-rule state). Prompts are `decode_prompt` random tokens per row."""
    rows = []
    rng = np.random.default_rng(2)
    n = sizes.decode_tokens
    float32_fps = None
    for batch, weights in [(b, "float32") for b in sizes.decode_batches] + [(1, "bfloat16")]:
        name = f"decode_batch_{batch}_{weights}"
        progress.set_postfix_str(name)
        ids = rng.integers(0, models.config.vocab_size, (batch, sizes.decode_prompt), dtype=np.int64)
        model = models.ours if weights == "float32" else models.ours_bfloat16
        short, long = _decode_seconds(lambda new: our_generate(model, ids, new), sizes)
        record.compiled(f"{name}_prefill_only", short)
        record.compiled(name, long)
        ours_s = long.median_s - short.median_s
        row = {"batch": batch, "weights": weights, "new_tokens": n, "prompt_tokens": sizes.decode_prompt,
               "ours_s": ours_s, "ours_tokens_per_s": batch * n / ours_s}  # fmt: skip
        if weights == "float32":
            ref_short, ref_long = _decode_seconds(lambda new: reference_generate(models.reference, ids, new), sizes)
            reference_s = ref_long.median_s - ref_short.median_s
            row.update(reference_s=reference_s, reference_tokens_per_s=batch * n / reference_s,
                       ratio=reference_s / ours_s)  # fmt: skip
            record.checks[f"{name}_tokens_match_reference"] = float(np.mean(long.result == ref_long.result))
            if batch == 1:
                float32_fps = row["ours_tokens_per_s"]
        else:
            row["speedup_over_float32"] = row["ours_tokens_per_s"] / float32_fps if float32_fps else None
        if batch == 1:
            row["weight_bytes_per_token"] = decode_weight_bytes(models.config, 4 if weights == "float32" else 2)
            if limits is not None:
                for side in ("ours", "reference"):
                    if f"{side}_tokens_per_s" in row:
                        rate = row[f"{side}_tokens_per_s"] * row["weight_bytes_per_token"]
                        row[f"{side}_fraction_of_bandwidth"] = rate / limits["bandwidth_bytes_per_s"]
        rows.append({k: v for k, v in row.items() if v is not None})
        progress.update()
    return rows


# --- the delta rule alone ------------------------------------------------------------------------------------------


def delta_inputs(seq: int, seed: int) -> tuple[np.ndarray, ...]:
    """q, k, v `[1, seq, 8, 64]`, log decays g in [-0.3, 0) and beta in (0, 1) `[1, seq, 8]`, float32."""
    rng = np.random.default_rng(seed)
    shape = (1, seq, DELTA_HEADS, DELTA_DIM)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    g = -0.3 * rng.random(shape[:3], dtype=np.float32)
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal(shape[:3], dtype=np.float32)))
    return q, k, v, g, beta


# Ours: the chunked form, and the recurrent form `recurrent_gated_delta_rule`, a `lax.scan` of `gated_delta_step`
# (the function each decode step calls); both jitted, both including the q/k normalization as the reference does.
_ours_chunked = jax.jit(chunked_gated_delta_rule)
_ours_recurrent = jax.jit(recurrent_gated_delta_rule)


def _reference_delta(form: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if form == "chunked":
        fn = functools.partial(reference_moe.torch_chunk_gated_delta_rule, chunk_size=REFERENCE_DELTA_CHUNK)
    else:
        fn = reference_moe.torch_recurrent_gated_delta_rule
    with torch.inference_mode():
        return fn(*inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)


def delta_rule(sizes: Sizes, record: Recorder, progress: tqdm) -> list[dict]:
    """Tokens/s of the delta rule alone (batch 1, 8 heads of 64): our chunked and recurrent forms, the reference's
    `torch_chunk_gated_delta_rule` and `torch_recurrent_gated_delta_rule`."""
    rows = []
    for seq in sizes.delta:
        inputs = delta_inputs(seq, seed=seq)
        ours_in = [jnp.asarray(x) for x in inputs]
        torch_in = [torch.from_numpy(x) for x in inputs]
        row: dict = {"tokens": seq, "ours_chunk": default_chunk_size(), "reference_chunk": REFERENCE_DELTA_CHUNK}
        for form, ours_fn in (("chunked", _ours_chunked), ("recurrent", _ours_recurrent)):
            name = f"delta_{seq}_{form}"
            progress.set_postfix_str(name)
            ours = record.compiled(name, timed(lambda: synced(ours_fn)(*ours_in), sizes.repeats))
            reference = timed(lambda: _reference_delta(form, *torch_in), sizes.repeats)
            record.checks[f"{name}_max_abs_output_diff"] = float(
                np.abs(np.asarray(ours.result[0]) - reference.result[0].numpy()).max()
            )
            row.update({
                f"ours_{form}_s": ours.median_s, f"reference_{form}_s": reference.median_s,
                f"ours_{form}_tokens_per_s": seq / ours.median_s,
                f"reference_{form}_tokens_per_s": seq / reference.median_s,
                f"{form}_ratio": reference.median_s / ours.median_s,
            })  # fmt: skip
            progress.update()
        row["ours_chunked_over_recurrent"] = row["ours_recurrent_s"] / row["ours_chunked_s"]
        rows.append(row)
    return rows


# --- one run -------------------------------------------------------------------------------------------------------

PARTS = ("limits", "delta", "prefill", "decode")


def steps(sizes: Sizes, parts: tuple[str, ...]) -> int:
    """The number of progress steps a run of `parts` takes (building the model is one)."""
    count = {"limits": 1, "delta": 2 * len(sizes.delta), "prefill": 2 * len(sizes.prefill),
             "decode": len(sizes.decode_batches) + 1}  # fmt: skip
    return sum(count[p] for p in parts) + (1 if {"prefill", "decode"} & set(parts) else 0)


def run(sizes: Sizes, parts: tuple[str, ...]) -> dict:
    """Measure `parts` (a subset of PARTS, run in PARTS order) -> the raw figures (see bench/run.py)."""
    record = Recorder()
    results: dict = {}
    with tqdm(total=steps(sizes, parts), desc="bench", unit="step") as progress:
        limits = None
        if "limits" in parts:
            progress.set_postfix_str("limits")
            limits = results["limits"] = machine_limits(sizes)
            progress.update()
        if "delta" in parts:
            results["delta_rule"] = delta_rule(sizes, record, progress)
        if {"prefill", "decode"} & set(parts):
            with tempfile.TemporaryDirectory(prefix="qwen-jax-bench-") as workdir:
                progress.set_postfix_str("building the model")
                models = build_models(sizes, Path(workdir))
                progress.update()
                counts = token_parameters(models.config)
                results["model"] = {
                    "config": dict(sizes.model), "parameters": counts.total, "active_parameters": counts.active,
                    "reference_parameters": sum(p.numel() for p in models.reference.parameters()),
                    "decode_weight_bytes_float32": decode_weight_bytes(models.config, 4),
                    "decode_weight_bytes_bfloat16": decode_weight_bytes(models.config, 2),
                    "reference_attention": models.reference.config._attn_implementation,
                    "reference_experts": getattr(models.reference.config, "_experts_implementation", None),
                }  # fmt: skip
                if "prefill" in parts:
                    results["prefill"] = prefill(models, sizes, limits, record, progress)
                if "decode" in parts:
                    results["decode"] = decode(models, sizes, limits, record, progress)
    results["compile_s"] = record.compile_s
    results["checks"] = record.checks
    return results
