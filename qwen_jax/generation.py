"""Text generation: a chunked prefill, then every decode step inside one jitted `lax.while_loop`.

Prompts are left-aligned and padded on the left to a length bucket, so all rows write the same cache slot at each
step and a new prompt length rarely recompiles. Padding never reaches the conv or delta-net state, nor attention.
`stream` yields tokens one step at a time from a jitted step that donates the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.cache import Cache, init_cache
from qwen_jax.config import TextConfig
from qwen_jax.errors import InputError
from qwen_jax.model import VisualInputs, compute_dtype, forward_with_cache
from qwen_jax.sampling import SamplingConfig, apply_penalties, sample

PREFILL_CHUNK = 256
MIN_BUCKET = 32
DEFAULT_MAX_NEW_TOKENS = 128


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    sampling: SamplingConfig
    max_new_tokens: int
    stop_tokens: tuple[int, ...]
    pad_token_id: int
    seed: int


def bucket_length(length: int, chunk: int = PREFILL_CHUNK) -> int:
    """Padded prompt length: a power of two (at least 32) up to `chunk`, then a multiple of `chunk`."""
    if length <= chunk:
        return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())
    return -(-length // chunk) * chunk


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray, length: int, pad: int) -> tuple[np.ndarray, ...]:
    """Move each row's real tokens to the right end of `length` slots. -> (ids, mask) `[batch, length]`."""
    batch = input_ids.shape[0]
    ids = np.full((batch, length), pad, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for row in range(batch):
        tokens = input_ids[row][attention_mask[row].astype(bool)]
        if len(tokens):
            ids[row, length - len(tokens) :] = tokens
            mask[row, length - len(tokens) :] = 1
    return ids, mask


class Prompt(NamedTuple):
    """A left-aligned, bucketed prompt batch: ids and mask `[batch, length]`, positions `[batch, length]` or
    `[3, batch, length]` (MRoPE), the next decode position per row `[batch]`, and vision features (or None)."""

    ids: jax.Array
    mask: jax.Array
    positions: jax.Array
    next_positions: jax.Array
    visual: VisualInputs | None


def _split_sequence(x: jax.Array, seq_axis: int, pieces: int) -> jax.Array:
    """`[..., length, ...]` -> `[pieces, ..., length / pieces, ...]` along `seq_axis`."""
    seq_axis %= x.ndim
    shape = x.shape[:seq_axis] + (pieces, x.shape[seq_axis] // pieces) + x.shape[seq_axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), seq_axis, 0)


def _prefill(params: Any, config: TextConfig, prompt: Prompt, max_len: int, piece: int):
    """Run the prompt through in pieces of `piece` slots (a `lax.scan`, so memory is that of one piece).
    Returns (last-slot logits `[batch, vocab]`, cache)."""
    batch, length = prompt.ids.shape
    n = length // piece
    cache = init_cache(config, batch, max_len, compute_dtype(params))
    visual = prompt.visual
    xs = (
        _split_sequence(prompt.ids, 1, n),
        _split_sequence(prompt.positions, -1, n),
        _split_sequence(prompt.mask, 1, n),
        None if visual is None else VisualInputs(*(_split_sequence(v, a, n) for v, a in zip(visual, (1, 1, 2)))),
    )

    def step(cache, xs):
        ids_p, pos_p, mask_p, visual_p = xs
        logits, cache = forward_with_cache(params, config, ids_p, pos_p, cache, mask_p, True, visual_p)
        return cache, logits

    cache, logits = jax.lax.scan(step, cache, xs)
    return logits[-1], cache


def _decode(params: Any, config: TextConfig, cache: Cache, tokens: jax.Array, positions: jax.Array):
    """One token per row: tokens, positions `[batch]` -> (logits `[batch, vocab]`, cache)."""
    mask = jnp.ones_like(tokens)[:, None]
    return forward_with_cache(params, config, tokens[:, None], positions[:, None], cache, mask, last_only=True)


def _choose(logits, seen, generated, done, rng, step, settings: GenerationSettings, stop_tokens):
    """Pick the next tokens and update the bookkeeping; stopped rows emit padding."""
    processed = apply_penalties(logits, seen, generated, settings.sampling)
    token = sample(processed, jax.random.fold_in(rng, step), settings.sampling)
    token = jnp.where(done, settings.pad_token_id, token)
    rows = jnp.arange(token.shape[0])
    live = ~done
    seen = seen.at[rows, token].max(live)
    generated = generated.at[rows, token].max(live)
    done = done | jnp.isin(token, stop_tokens)
    return token, seen, generated, done


def _prompt_seen(ids: jax.Array, mask: jax.Array, vocab: int) -> jax.Array:
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], vocab), bool).at[rows, ids].max(mask.astype(bool))


@functools.partial(jax.jit, static_argnames=("config", "settings", "piece"))
def _generate(params, config: TextConfig, prompt: Prompt, settings: GenerationSettings, piece: int):
    batch, length = prompt.ids.shape
    n = settings.max_new_tokens
    stop_tokens = jnp.asarray(settings.stop_tokens or (-1,), jnp.int32)
    rng = jax.random.key(settings.seed)
    logits, cache = _prefill(params, config, prompt, length + n, piece)
    positions = prompt.next_positions
    seen = _prompt_seen(prompt.ids, prompt.mask, config.vocab_size)
    generated = jnp.zeros_like(seen)
    done = ~jnp.any(prompt.mask.astype(bool), axis=-1)  # rows of padding only are done from the start
    token, seen, generated, done = _choose(logits, seen, generated, done, rng, 0, settings, stop_tokens)
    out = jnp.full((batch, n), settings.pad_token_id, jnp.int32).at[:, 0].set(token)

    def cond(state):
        step, *_, done = state
        return (step < n) & ~jnp.all(done)

    def body(state):
        step, out, token, positions, cache, seen, generated, done = state
        logits, cache = _decode(params, config, cache, token, positions)
        token, seen, generated, done = _choose(logits, seen, generated, done, rng, step, settings, stop_tokens)
        out = out.at[:, step].set(token)
        return step + 1, out, token, positions + 1, cache, seen, generated, done

    state = (jnp.int32(1), out, token, positions, cache, seen, generated, done)
    return jax.lax.while_loop(cond, body, state)[1]


def read_generation_config(model: Any) -> dict:
    """The `generation_config.json` of a loaded model (or of a model directory), {} if it has none."""
    path = model if isinstance(model, Path) else getattr(model, "path", None)
    file = None if path is None else path / "generation_config.json"
    if file is None or not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{file}: not valid JSON ({e})") from None


def resolve_settings(
    model: Any,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> GenerationSettings:
    """Unset arguments come from the checkpoint's `generation_config.json`, then from greedy decoding."""
    gen = read_generation_config(model)

    def pick(value, key, default):
        return value if value is not None else (gen.get(key) if gen.get(key) is not None else default)

    if temperature is None:
        temperature = float(gen.get("temperature") or 1.0) if gen.get("do_sample") else 0.0
    eos = pick(eos_token_id, "eos_token_id", ())
    stop = tuple(int(t) for t in ([eos] if isinstance(eos, int) else eos))
    pad = pick(pad_token_id, "pad_token_id", stop[0] if stop else 0)
    try:
        sampling = SamplingConfig(
            temperature=float(temperature),
            top_k=int(pick(top_k, "top_k", 0)),
            top_p=float(pick(top_p, "top_p", 1.0)),
            min_p=float(pick(min_p, "min_p", 0.0)),
            repetition_penalty=float(pick(repetition_penalty, "repetition_penalty", 1.0)),
            presence_penalty=float(pick(presence_penalty, "presence_penalty", 0.0)),
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    n = int(pick(max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    if n < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {n}")
    return GenerationSettings(sampling, n, stop, int(pad), int(seed))


def _prepare_prompt(
    model: Any, input_ids: Any, attention_mask: Any, settings: GenerationSettings, vision: dict, chunk: int
):
    from qwen_jax.multimodal import positions_for, visual_inputs

    ids = np.asarray(input_ids, np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    longest = int(mask.sum(-1).max())
    if longest == 0:
        raise InputError("empty prompt")
    context = model.config.text.max_position_embeddings
    if longest + settings.max_new_tokens > context:
        raise InputError(
            f"prompt of {longest} tokens + {settings.max_new_tokens} new tokens exceeds the context of {context}"
        )
    if chunk < 1 or chunk & (chunk - 1):
        raise InputError(f"prefill_chunk must be a power of two, got {chunk}")
    length = bucket_length(longest, chunk)
    mesh = getattr(model, "mesh", None)
    if mesh is not None:  # rows of padding so that the batch splits over the mesh's data axes
        from qwen_jax.sharding import batch_divisor

        extra = (-ids.shape[0]) % batch_divisor(mesh)
        ids = np.concatenate([ids, np.zeros((extra, ids.shape[1]), ids.dtype)])
        mask = np.concatenate([mask, np.zeros((extra, mask.shape[1]), mask.dtype)])
    ids, mask = left_align(ids, mask, length, settings.pad_token_id)
    # mm_token_type_ids are accepted for compatibility with the processor's outputs; the placeholder tokens of the
    # re-aligned ids say the same thing.
    positions, next_positions = positions_for(
        model.config, ids, mask, vision.get("image_grid_thw"), vision.get("video_grid_thw")
    )
    visual = visual_inputs(
        model.params, model.config, ids, vision.get("pixel_values"), vision.get("image_grid_thw"),
        vision.get("pixel_values_videos"), vision.get("video_grid_thw"),
    )  # fmt: skip
    # Host arrays: under jit they count as replicated inputs, also on multi-host meshes.
    prompt = Prompt(ids, mask, np.asarray(positions), np.asarray(next_positions), visual)
    return prompt, min(length, chunk)


VISION_ARGUMENTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    vision = {k: kwargs.pop(k) for k in VISION_ARGUMENTS if k in kwargs}
    return vision, kwargs


def generate(model: Any, input_ids: Any, attention_mask: Any | None = None, **kwargs: Any) -> np.ndarray:
    """Generate `[batch, max_new_tokens]` tokens after each prompt (positions after a row stops hold the pad id).

    input_ids `[batch, seq]` (or `[seq]`); attention_mask marks real tokens (any padding side). Keyword arguments:
    max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, eos_token_id (int or
    list), pad_token_id, seed (see `resolve_settings`); prefill_chunk (a power of two, default 256: the prompt
    runs through in pieces of this many slots, so its memory is that of one piece); and for vision-language models
    pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, mm_token_type_ids as the processor makes
    them.
    """
    vision, kwargs = _split_kwargs(dict(kwargs))
    chunk = int(kwargs.pop("prefill_chunk", PREFILL_CHUNK))
    settings = resolve_settings(model, **kwargs)
    batch = np.atleast_2d(np.asarray(input_ids)).shape[0]
    with _mesh_of(model):
        prompt, piece = _prepare_prompt(model, input_ids, attention_mask, settings, vision, chunk)
        return to_host(_generate(model.params, model.config.text, prompt, settings, piece))[:batch]


def to_host(x: jax.Array) -> np.ndarray:
    """A numpy copy of x, gathered from every process when x spans several."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _mesh_of(model: Any) -> Any:
    activate = getattr(model, "activate", None)
    return activate() if activate is not None else contextlib.nullcontext()


@functools.partial(jax.jit, static_argnames=("config", "max_len", "piece"))
def _jit_prefill(params, prompt, config, max_len, piece):
    return _prefill(params, config, prompt, max_len, piece)


@functools.partial(jax.jit, static_argnames=("config", "settings"), donate_argnames=("cache",))
def _jit_step(params, cache, token, positions, seen, generated, done, rng, step, config, settings):
    stop_tokens = jnp.asarray(settings.stop_tokens or (-1,), jnp.int32)
    logits, cache = _decode(params, config, cache, token, positions)
    token, seen, generated, done = _choose(logits, seen, generated, done, rng, step, settings, stop_tokens)
    return token, cache, seen, generated, done


_COMPILED: dict = {}


def _compiled(fn: Any, args: tuple, static: dict, timings: dict) -> Any:
    """Ahead-of-time compile `fn` for these argument shapes (cached), adding the compile time to timings."""
    key = (fn, tuple(static.items()), tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
    if key not in _COMPILED:
        start = time.perf_counter()
        _COMPILED[key] = fn.lower(*args, **static).compile()
        timings["compile_s"] = timings.get("compile_s", 0.0) + time.perf_counter() - start
    return _COMPILED[key]


def stream(
    model: Any, input_ids: Any, attention_mask: Any | None = None, timings: dict | None = None, **kwargs: Any
) -> Iterator[np.ndarray]:
    """Like `generate`, but yields the `[batch]` tokens of each step as they are produced; stops when every row
    has stopped or after max_new_tokens steps. If given, `timings` receives compile_s, prefill_s,
    prefill_tokens_per_s, decode_s and decode_tokens_per_s (per row)."""
    with _mesh_of(model):
        yield from _stream(model, input_ids, attention_mask, timings, **kwargs)


def _stream(model: Any, input_ids: Any, attention_mask: Any, timings: dict | None, **kwargs: Any):
    timings = {} if timings is None else timings
    batch = np.atleast_2d(np.asarray(input_ids)).shape[0]
    vision, kwargs = _split_kwargs(dict(kwargs))
    chunk = int(kwargs.pop("prefill_chunk", PREFILL_CHUNK))
    settings = resolve_settings(model, **kwargs)
    prompt, piece = _prepare_prompt(model, input_ids, attention_mask, settings, vision, chunk)
    ids, mask = prompt.ids, prompt.mask
    config, params = model.config.text, model.params
    max_len = ids.shape[1] + settings.max_new_tokens
    prefill = _compiled(_jit_prefill, (params, prompt), dict(config=config, max_len=max_len, piece=piece), timings)
    start = time.perf_counter()
    logits, cache = prefill(params, prompt)
    positions = prompt.next_positions
    rng = jax.random.key(settings.seed)
    stop_tokens = jnp.asarray(settings.stop_tokens or (-1,), jnp.int32)
    seen = _prompt_seen(ids, mask, config.vocab_size)
    done = ~jnp.any(mask.astype(bool), axis=-1)
    token, seen, generated, done = _choose(logits, seen, jnp.zeros_like(seen), done, rng, 0, settings, stop_tokens)
    token = to_host(token)
    timings["prefill_s"] = time.perf_counter() - start
    timings["prefill_tokens_per_s"] = int(np.asarray(mask).sum()) / timings["prefill_s"]
    yield token[:batch]
    state = (cache, jnp.asarray(token), positions, seen, generated, done)
    step_args = (params, *state, rng, jnp.int32(1))
    decode = _compiled(_jit_step, step_args, dict(config=config, settings=settings), timings)
    start, steps = time.perf_counter(), 0
    for step in range(1, settings.max_new_tokens):
        cache, token, positions, seen, generated, done = state
        if bool(jnp.all(done)):
            break
        token, cache, seen, generated, done = decode(
            params, cache, token, positions, seen, generated, done, rng, jnp.int32(step)
        )
        state = (cache, token, positions + 1, seen, generated, done)
        steps += 1
        yield to_host(token)[:batch]
    timings["decode_s"] = time.perf_counter() - start
    timings["decode_tokens_per_s"] = steps / timings["decode_s"] if steps else 0.0
