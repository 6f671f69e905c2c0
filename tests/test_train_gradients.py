"""Training parity: the train step's objective and every gradient tensor against the reference's loss and torch
autograd, for each text family, on padded batches and on packed documents.

The reference runs in float64 (its exact answer; ours is float32). Tolerance: max |ours - reference| <= 1e-4 x
max |reference gradient| per tensor, except the decay's parameters `A_log`, `dt_bias` and `in_proj_a` (whose
output feeds only the decay): 5e-4. Their gradients sum strongly cancelling terms over every token (max values
~1e-5 against ~1e-2 elsewhere), so float32 rounding of the per-token terms shows 100x amplified: the reference's own
float32 gradients are off from its float64 ones by up to 1.0e-4 of the max for `A_log` and 5e-5 for `in_proj_a`,
ours by up to 1.7e-4 and 1.4e-4 (measured on these models and the image batch of test_train_images), while every
other tensor of both is within 3e-5. Gradients
are compared in our parameter layout: the reference's gradients go through the converter's own layout rules
(transposes, splits, concatenations: linear maps, so they map gradients as they map weights).

Batches `[2, 128]` (one compile per family for both cases): padded, rows C and A alone, right-padded, against the
reference on that same batch with its attention mask and labels (load-balancing loss included, its weight raised to
0.5 so that a mistake in it shows); packed, row 0 = A then B, row 1 = C, against the reference run on A, B and C one
at a time (no load-balancing term: it is not additive over documents).
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import VOCAB
from qwen_jax.checkpoint.hf_mapping import apply_rule, plan
from qwen_jax.model import decoder_outputs, output_weights, segment_positions
from qwen_jax.stacking import unstack_layers
from qwen_jax.train.data import shift_targets
from qwen_jax.train.loss import token_cross_entropy
from qwen_jax.train.trainer import LossSettings, batch_objective

SEQ = 128
LENGTHS = {"A": 70, "B": 50, "C": 100}
AUX_COEF = 0.5
FAMILIES = ["qwen3_5_dense", "qwen3_5_moe_fused", "qwen3_next", "qwen3_vl", "qwen3_vl_moe"]


def documents(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.integers(1, VOCAB - 10, size=n) for name, n in LENGTHS.items()}


def our_batch(rows: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of documents packed left to right and right-padded to SEQ."""
    ids = np.zeros((len(rows), SEQ), np.int32)
    segments = np.zeros((len(rows), SEQ), np.int32)
    for r, docs in enumerate(rows):
        start = 0
        for s, doc in enumerate(docs, 1):
            ids[r, start : start + len(doc)] = doc
            segments[r, start : start + len(doc)] = s
            start += len(doc)
    targets, loss_mask = shift_targets(ids, segments, (segments > 0).astype(np.float32))
    positions = np.asarray(segment_positions(jnp.asarray(segments)))
    return {"input_ids": ids, "segment_ids": segments, "positions": positions, "targets": targets,
            "loss_mask": loss_mask}  # fmt: skip


@functools.partial(jax.jit, static_argnames=("config", "settings"))
def our_objective_and_grads(params, config, batch, settings):
    """(the step objective, its summed cross-entropy, gradients, masked per-token losses `[batch, seq]`)."""
    normalizer = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    grad_fn = jax.value_and_grad(batch_objective, has_aux=True)
    (objective, (ce_sum, _)), grads = grad_fn(params, config, batch, settings, normalizer, 1)
    out = decoder_outputs(params, config, batch["input_ids"], batch["positions"], batch["segment_ids"])
    losses = token_cross_entropy(out.hidden, output_weights(params, config), batch["targets"]) * batch["loss_mask"]
    return objective, ce_sum, grads, losses


def set_aux_coef(reference: torch.nn.Module, coef: float) -> None:
    """The weight of the reference's load-balancing loss (its models read it from the config or keep a copy)."""
    config = getattr(reference.config, "text_config", reference.config)
    config.router_aux_loss_coef = coef
    if hasattr(reference, "router_aux_loss_coef"):
        reference.router_aux_loss_coef = coef


def reference_loss(reference, ids: np.ndarray, mask: np.ndarray, moe: bool, aux: bool) -> torch.Tensor:
    """The reference's training loss on `ids [batch, seq]` (mask 1 = token): mean cross-entropy over the labelled
    next tokens, plus the load-balancing term when `aux`."""
    labels = np.where(mask > 0, ids, -100)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    kwargs = {"output_router_logits": aux} if moe else {}
    out = reference(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    position_ids=torch.from_numpy(np.ascontiguousarray(positions)).long(),
                    labels=torch.from_numpy(labels).long(), **kwargs)  # fmt: skip
    return out.loss


def reference_grads_in_our_layout(built, reference) -> dict[str, np.ndarray]:
    grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().numpy()
        for name, p in reference.named_parameters()
    }
    config = built.model.config
    rules = plan(config, {k: v.shape for k, v in grads.items()}, transformers_version=transformers.__version__).rules
    out = {}
    for rule in rules:
        for path, array in zip(rule.targets, apply_rule(rule, [grads[s] for s in rule.sources], config.text)):
            out[path] = array
    return out


def flat_paths(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_paths(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def compare_grads(
    ours_stacked, reference_grads: dict, config, visual: bool = False, cancelling_tolerance: float = 5e-4
) -> None:
    """Every gradient tensor within 1e-4 x its largest reference value, `A_log` / `dt_bias` within
    `cancelling_tolerance` x (see the module docstring); `visual`: the vision tower's gradients too."""
    ours = flat_paths(unstack_layers(dict(ours_stacked), config))
    expected_paths = {p for p in reference_grads if visual or not p.startswith("visual/")}
    assert set(ours) == expected_paths, sorted(set(ours) ^ expected_paths)[:10]
    for path in sorted(ours):
        ref = reference_grads[path].reshape(ours[path].shape)
        scale = float(np.abs(ref).max())
        err = float(np.abs(ours[path] - ref).max())
        cancelling = path.rsplit("/", 1)[-1] in ("A_log", "dt_bias") or path.endswith("in_proj_a/kernel")
        tolerance = cancelling_tolerance if cancelling else 1e-4
        assert err <= tolerance * scale + 1e-12, (path, err, scale)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_and_packed_gradients_equal_reference(built_models, family):
    built = built_models(family)
    params, config = built.model.params, built.model.config.text
    reference = copy.deepcopy(built.reference).double()
    if hasattr(reference, "set_experts_implementation"):
        reference.set_experts_implementation("eager")  # torch's grouped_mm has no float64
    moe = config.num_experts > 0
    docs = documents(seed=len(family))
    params = {k: v for k, v in params.items() if k != "visual"}

    # Padded rows: the reference on the same batch.
    rows = [[docs["C"]], [docs["A"]]]
    batch = our_batch(rows)
    settings = LossSettings(aux_loss_coef=AUX_COEF if moe else 0.0, top_k=max(config.num_experts_per_tok, 1))
    objective, _, grads, _ = our_objective_and_grads(params, config, batch, settings)
    if moe:
        set_aux_coef(reference, AUX_COEF)
    loss = reference_loss(reference, batch["input_ids"], (batch["segment_ids"] > 0).astype(np.int64), moe, moe)
    loss.backward()
    loss = float(loss.detach())
    assert abs(float(objective) - loss) <= 1e-5 * abs(loss), (float(objective), loss)
    compare_grads(grads, reference_grads_in_our_layout(built, reference), config)

    # Packed documents: the reference on each document alone; sums of losses over all targets.
    batch = our_batch([[docs["A"], docs["B"]], [docs["C"]]])
    settings = LossSettings(aux_loss_coef=0.0, top_k=max(config.num_experts_per_tok, 1))
    objective, ce_sum, grads, losses = our_objective_and_grads(params, config, batch, settings)
    losses, segments = np.asarray(losses), batch["segment_ids"]
    ours_per_document = {name: float(losses[row][segments[row] == s].sum())
                         for name, row, s in (("A", 0, 1), ("B", 0, 2), ("C", 1, 1))}  # fmt: skip
    targets = sum(n - 1 for n in LENGTHS.values())
    assert float(np.sum(batch["loss_mask"])) == targets
    reference.zero_grad()
    per_document = {}
    for name, doc in docs.items():
        loss = reference_loss(reference, doc[None], np.ones((1, len(doc)), np.int64), moe, False)
        per_document[name] = float(loss.detach()) * (len(doc) - 1)
        (loss * (len(doc) - 1) / targets).backward()
    for name, value in per_document.items():  # packing leaks nothing: each document's loss is its own
        assert abs(ours_per_document[name] - value) <= 1e-5 * value, (name, ours_per_document, per_document)
    reference_total = sum(per_document.values())
    assert abs(float(ce_sum) - reference_total) <= 1e-5 * reference_total, (float(ce_sum), per_document)
    assert abs(float(objective) - reference_total / targets) <= 1e-5 * float(objective)
    compare_grads(grads, reference_grads_in_our_layout(built, reference), config)
