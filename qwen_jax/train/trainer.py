"""The training loop: a `TrainState`, a jitted train step with gradient accumulation, Orbax checkpoints of the whole
state (and the data iterator's position) with resume, metrics on the console and in a JSONL log, and the trained
model saved in the model format at the end.

    from qwen_jax.train import load_recipe, train
    result = train(load_recipe("configs/demo-train.json"))

The objective of one optimizer step over its `grad_accum` micro-batches `[batch, seq]` is

    sum of masked token cross-entropies / number of masked targets (over all micro-batches)
    + aux_loss_coef * mean over micro-batches of the MoE load-balancing loss (`loss.load_balancing_loss`)

so accumulation does not change the loss: a step over two micro-batches equals one over their concatenation
(for the cross-entropy; the load-balancing loss is per micro-batch, as the reference computes it per forward).

Master parameters and the optimizer state are float32; with `dtype: bfloat16` the forward and backward compute in
bfloat16 (norms, `A_log`, `dt_bias` stay float32). Parameters are in the stacked layout (`qwen_jax.stacking`).
With a mesh, parameters (and so the optimizer state) are sharded by their logical axes (`qwen_jax.sharding`) and
each batch is split over the `data` x `fsdp` axes.

Checkpoints (`run_dir/checkpoints/<step>/`) hold the state and the grain iterator state; a run started on a
`run_dir` that has them resumes from the latest, truncates `metrics.jsonl` to that step and continues with exactly
the batches an uninterrupted run would have seen, so its losses are the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qwen_jax.chat import ChatTokenizer
from qwen_jax.checkpoint.hf_mapping import keeps_float32
from qwen_jax.config import ModelConfig, TextConfig, VisionConfig, parse_config
from qwen_jax.errors import InputError
from qwen_jax.model import compute_dtype, decoder_outputs, init_params, output_weights, stacked_param_shardings
from qwen_jax.multimodal import packed_visual_inputs
from qwen_jax.train.data import image_paths, load_documents, packed_batches, split_documents
from qwen_jax.train.images import LAYOUT_KEYS, ImageInputs
from qwen_jax.train.loss import load_balancing_loss, masked_sum, token_cross_entropy
from qwen_jax.train.optimizer import learning_rate_schedule, make_optimizer, param_path
from qwen_jax.train.recipe import Recipe
from qwen_jax.vision import PatchLayout, init_vision_params

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class TrainState(NamedTuple):
    """Everything a step changes: `step` (int32 scalar, optimizer steps done), float32 `params` (stacked layout),
    `opt_state`, and `rng` (a raw uint32 PRNG key, split once per step)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static parts of the objective."""

    aux_loss_coef: float = 0.0
    top_k: int = 1
    remat: bool = False
    loss_chunk: int = 1024
    compute_dtype: str = "float32"
    vision: VisionConfig | None = None  # the tower that encodes batches' images (`pixel_values`)
    image_token_id: int = -1


def compute_params(params: Any, dtype: str) -> Any:
    """Parameters cast to the compute dtype, except those always kept float32."""
    if jnp.dtype(dtype) == jnp.float32:
        return params

    def cast(path: tuple, x: jax.Array) -> jax.Array:
        return x if keeps_float32(param_path(path)) else x.astype(dtype)

    return jax.tree.map_with_path(cast, params)


def batch_objective(
    params: Any, config: TextConfig, batch: dict, settings: LossSettings, normalizer: jax.Array, micro_batches: int
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(this micro-batch's share of the step objective, (sum of masked cross-entropies, load-balancing loss)).

    batch: `[batch, seq]` arrays `input_ids`, `segment_ids`, `positions`, `targets`, `loss_mask`, and for batches
    with images `mrope_positions`, `pixel_values` and the patch layout (`qwen_jax.train.data`); normalizer: the
    step's number of masked targets."""
    params = compute_params(params, settings.compute_dtype)
    positions, visual = batch["positions"], None
    if "pixel_values" in batch:
        positions = jnp.moveaxis(batch["mrope_positions"], -1, 0)
        layout = PatchLayout(*(batch[k] for k in LAYOUT_KEYS))
        visual = packed_visual_inputs(params["visual"], settings.vision, settings.image_token_id, batch["input_ids"],
                                      batch["pixel_values"], layout, compute_dtype(params))  # fmt: skip
    out = decoder_outputs(
        params, config, batch["input_ids"], positions, batch["segment_ids"], visual, remat=settings.remat
    )
    losses = token_cross_entropy(out.hidden, output_weights(params, config), batch["targets"], settings.loss_chunk)
    ce_sum = masked_sum(losses, batch["loss_mask"])
    aux = jnp.float32(0.0)
    if settings.aux_loss_coef and out.router_logits is not None:
        aux = load_balancing_loss(out.router_logits, settings.top_k, batch["segment_ids"].reshape(-1) > 0)
    return ce_sum / normalizer + settings.aux_loss_coef * aux / micro_batches, (ce_sum, aux)


def make_train_step(
    config: TextConfig, optimizer: optax.GradientTransformation, settings: LossSettings, schedule: optax.Schedule
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A jitted `step(state, batches) -> (state, metrics)` (the state is donated). batches: `[grad_accum, batch,
    seq]` arrays; metrics: float32 scalars `loss` (mean masked cross-entropy), `aux_loss`, `objective`,
    `grad_norm`, `learning_rate`, `tokens` (masked targets)."""

    def step(state: TrainState, batches: dict) -> tuple[TrainState, dict]:
        micro_batches = batches["input_ids"].shape[0]
        normalizer = jnp.maximum(jnp.sum(batches["loss_mask"]), 1.0)
        grad_fn = jax.value_and_grad(batch_objective, has_aux=True)

        def accumulate(grads: Any, batch: dict) -> tuple[Any, tuple]:
            (objective, (ce_sum, aux)), g = grad_fn(state.params, config, batch, settings, normalizer, micro_batches)
            return jax.tree.map(jnp.add, grads, g), (objective, ce_sum, aux)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (objectives, ce_sums, auxes) = jax.lax.scan(accumulate, zeros, batches)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
        metrics = {
            "loss": jnp.sum(ce_sums) / normalizer,
            "aux_loss": jnp.mean(auxes),
            "objective": jnp.sum(objectives),
            "grad_norm": optax.global_norm(grads),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "tokens": jnp.sum(batches["loss_mask"]),
        }
        return TrainState(state.step + 1, params, opt_state, jax.random.key_data(rng)), metrics

    return jax.jit(step, donate_argnums=0)


# ---------------------------------------------------------------------------------------------------- setup


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: no such {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def router_aux_coef(raw_config: dict) -> float:
    """The load-balancing weight a reference forward adds: `router_aux_loss_coef` when `output_router_logits` is on
    (read from `text_config` for the composite model types), else 0."""
    text = raw_config.get("text_config", raw_config)
    if not text.get("output_router_logits", raw_config.get("output_router_logits", False)):
        return 0.0
    return float(text.get("router_aux_loss_coef", raw_config.get("router_aux_loss_coef", 0.001)))


@dataclasses.dataclass
class TrainResult:
    """What a run produced: the model directory, the per-step metrics of this process's steps, the held-out loss
    and the unigram baseline (nats per target token; None without held-out documents)."""

    output: Path
    metrics: list[dict]
    held_out_loss: float | None
    unigram_loss: float | None
    held_out_tokens: int


def _initial_params(recipe: Recipe, config: ModelConfig) -> Any:
    if recipe.init is None:
        key = jax.random.key(recipe.seed)
        params = init_params(config.text, key, jnp.float32)
        if config.vision is not None:
            params["visual"] = init_vision_params(config.vision, jax.random.fold_in(key, 1))
        return params
    import qwen_jax

    params = qwen_jax.load(recipe.init, scan_layers=config.text.scan_layers).params
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _rewrite_metrics(path: Path, last_step: int) -> list[dict]:
    """Keep the records of steps <= last_step (those the restored state has done); returns them."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["step"] <= last_step]
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    Path(f.name).replace(path)
    return records


def train(
    recipe: Recipe,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Run (or resume) the recipe; see the module docstring. `callback(step, metrics)` is called after each
    optimizer step (1-based step, host floats) once its metrics are logged and any checkpoint of it is written."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from qwen_jax.train.evaluate import held_out_loss, unigram_baseline
    from qwen_jax.train.model_dir import save_model_dir

    if Path(recipe.output).exists():
        raise InputError(f"output {recipe.output} already exists; choose a new output directory")
    raw_config = _read_json(Path(recipe.init or "") / "config.json" if recipe.init else Path(recipe.model_config),
                            "model config")  # fmt: skip
    model_config = parse_config(raw_config)
    config = model_config.text
    tokenizer_dir = Path(recipe.tokenizer or recipe.init)
    tokenizer = ChatTokenizer(tokenizer_dir)
    if tokenizer.tokenizer.get_vocab_size() > config.vocab_size:
        raise InputError(
            f"the tokenizer has {tokenizer.tokenizer.get_vocab_size()} tokens, the model's vocab_size is only "
            f"{config.vocab_size}"
        )
    documents = load_documents(recipe.data, recipe.delimiter)
    train_docs, held_docs = split_documents(documents, recipe.held_out_fraction)
    images = None
    if any("messages" in d and image_paths(d) for d in documents):
        from qwen_jax.processing import ProcessorConfig

        settings_dir = Path(recipe.init) if recipe.init else Path(recipe.model_config).parent
        settings = ProcessorConfig.from_dir(settings_dir).image
        images = ImageInputs.for_model(model_config, settings, recipe.image_patches_per_row)
    rows = recipe.batch_size * recipe.grad_accum
    dataset = packed_batches(
        train_docs, tokenizer, seq_len=recipe.seq_len, batch_size=rows, seed=recipe.seed, images=images
    )
    iterator = iter(dataset)

    mesh = None
    if recipe.mesh:
        from qwen_jax.sharding import batch_sharding, make_mesh

        mesh = make_mesh(recipe.mesh)
    schedule = learning_rate_schedule(
        recipe.learning_rate, recipe.warmup_steps, recipe.steps, recipe.end_learning_rate_fraction
    )
    aux_coef = router_aux_coef(raw_config) if recipe.aux_loss_coef is None else recipe.aux_loss_coef
    settings = LossSettings(aux_coef, config.num_experts_per_tok, recipe.remat, recipe.loss_chunk, recipe.dtype,
                            images and images.vision, images.image_token_id if images else -1)  # fmt: skip

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        params = _initial_params(recipe, model_config)
        optimizer = make_optimizer(
            params, learning_rate=schedule, weight_decay=recipe.weight_decay, b1=recipe.adam_b1, b2=recipe.adam_b2,
            eps=recipe.adam_eps, clip_norm=recipe.clip_norm, frozen=recipe.frozen,
        )  # fmt: skip
        if mesh is not None:
            text = {k: v for k, v in params.items() if k != "visual"}
            params = dict(params, **jax.device_put(text, stacked_param_shardings(text, config, mesh)))
        state = TrainState(
            jnp.int32(0), params, jax.jit(optimizer.init)(params), jax.random.key_data(jax.random.key(recipe.seed + 1))
        )
        step_fn = make_train_step(config, optimizer, settings, schedule)

        run_dir = Path(recipe.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = run_dir / METRICS_FILE
        manager = ocp.CheckpointManager(
            (run_dir / CHECKPOINT_DIR).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=recipe.keep_checkpoints, enable_async_checkpointing=False),
        )
        start = manager.latest_step() or 0
        if start:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            restored = manager.restore(
                start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
            )
            state = TrainState(*restored["state"])
            iterator.set_state(restored["data"])
            log(f"resumed from {run_dir / CHECKPOINT_DIR / str(start)}")
        _rewrite_metrics(metrics_path, start)

        records: list[dict] = []
        bar = tqdm(total=recipe.steps, initial=start, desc="training", unit="step", disable=not progress or None)
        pending: list[tuple[int, dict]] = []
        window_start = time.perf_counter()

        def flush() -> None:
            nonlocal window_start
            if not pending:
                return
            host = jax.device_get([m for _, m in pending])
            elapsed = time.perf_counter() - window_start
            tokens = sum(float(m["tokens"]) for m in host)
            with metrics_path.open("a") as f:
                for (step, _), m in zip(pending, host):
                    record = {"step": step, **{k: float(v) for k, v in m.items()}}
                    record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                    f.write(json.dumps(record) + "\n")
                    records.append(record)
            bar.update(len(pending))
            bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", tok_s=f"{records[-1]['tokens_per_s']:.0f}")
            pending.clear()
            window_start = time.perf_counter()

        for step in range(start + 1, recipe.steps + 1):
            batch = {
                k: v.reshape(recipe.grad_accum, recipe.batch_size, *v.shape[1:]) for k, v in next(iterator).items()
            }
            if mesh is not None:
                batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim, batch_axis=1)) for k, v in batch.items()}
            state, metrics = step_fn(state, batch)
            pending.append((step, metrics))
            save = step % recipe.checkpoint_every == 0 or step == recipe.steps
            if save or step % recipe.log_every == 0 or callback is not None:
                flush()
            if save:
                manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator.get_state())
                    ),
                )
                manager.wait_until_finished()
            if callback is not None:
                callback(step, records[-1])
        flush()
        bar.close()
        manager.close()

        held, unigram, held_tokens = None, None, 0
        if held_docs:
            held, held_tokens = held_out_loss(
                state.params, config, held_docs, tokenizer, recipe.seq_len, recipe.batch_size, recipe.loss_chunk, images
            )
            unigram = unigram_baseline(train_docs, held_docs, tokenizer, recipe.seq_len, config.vocab_size, images)
            log(f"held-out loss {held:.4f} nats/token over {held_tokens} tokens (unigram baseline {unigram:.4f})")
        output = save_model_dir(
            recipe.output, state.params, config, raw_config, tokenizer_dir, recipe.save_dtype, recipe.init
        )
    log(f"wrote {output}")
    return TrainResult(output, records, held, unigram, held_tokens)
