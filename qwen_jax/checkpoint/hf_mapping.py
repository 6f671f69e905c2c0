"""The one table between Hugging Face checkpoint keys and this library's parameter tree.

`plan(config, keys)` lists `Rule`s: which source tensors (with the shapes the config implies) become which parameter
paths through which layout op. Every layout that exists in practice maps onto one internal layout:
- linear `weight [out, in]` -> `kernel [in, out]`; conv `[channels, 1, K]` -> `[K, channels]`;
- Qwen3-Next fused `in_proj_qkvz` / `in_proj_ba` (grouped per key head) -> split `in_proj_qkv, z, b, a`;
- per-expert `experts.{e}.{gate,up,down}_proj.weight` or fused `experts.gate_up_proj [E, 2I, H]`,
  `experts.down_proj [E, H, I]` -> `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`.
The ops are plain numpy so that an exporter can invert them from the same rules.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from qwen_jax.config import LINEAR_ATTENTION, ModelConfig, TextConfig
from qwen_jax.errors import InputError

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    op: str
    sources: tuple[str, ...]
    source_shapes: tuple[Shape, ...]
    targets: tuple[str, ...]  # parameter paths, "/"-separated


class MappingError(InputError):
    """Checkpoint keys that do not match the configured model."""


def keeps_float32(path: str) -> bool:
    """Parameters stored and used in float32 whatever the model dtype: `A_log`, `dt_bias` and every norm weight.

    `path` is a parameter path ("layers_0/linear_attn/A_log") or a Hugging Face key ("mtp.norm.weight").
    """
    parts = path.replace(".", "/").split("/")
    return parts[-1] in ("A_log", "dt_bias") or (parts[-1] == "weight" and "norm" in parts[-2])


def _grouped(w: np.ndarray, groups: int, sizes: list[int]) -> list[np.ndarray]:
    """Split rows of `w [groups * sum(sizes), in]` viewed per group, concatenating each part over the groups."""
    w = w.reshape(groups, sum(sizes), w.shape[-1])
    bounds = np.cumsum([0, *sizes])
    return [w[:, a:b].reshape(-1, w.shape[-1]) for a, b in zip(bounds[:-1], bounds[1:])]


def _split_qkvz(w: np.ndarray, c: TextConfig) -> list[np.ndarray]:
    r = c.linear_num_value_heads // c.linear_num_key_heads
    dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
    q, k, v, z = _grouped(w, c.linear_num_key_heads, [dk, dk, r * dv, r * dv])
    return [np.concatenate([q, k, v]).T, z.T]


def _split_ba(w: np.ndarray, c: TextConfig) -> list[np.ndarray]:
    r = c.linear_num_value_heads // c.linear_num_key_heads
    b, a = _grouped(w, c.linear_num_key_heads, [r, r])
    return [b.T, a.T]


OPS: dict[str, Callable[[list[np.ndarray], TextConfig], list[np.ndarray]]] = {
    "copy": lambda xs, c: [xs[0]],
    "transpose": lambda xs, c: [np.swapaxes(xs[0], -1, -2)],
    "conv": lambda xs, c: [xs[0][:, 0, :].T],
    "split_qkvz": lambda xs, c: _split_qkvz(xs[0], c),
    "split_ba": lambda xs, c: _split_ba(xs[0], c),
    "stack_gate_up": lambda xs, c: [np.stack([np.concatenate(xs[i : i + 2]).T for i in range(0, len(xs), 2)])],
    "stack_transpose": lambda xs, c: [np.stack([x.T for x in xs])],
}


def apply_rule(rule: Rule, sources: list[np.ndarray], config: TextConfig) -> list[np.ndarray]:
    return [np.ascontiguousarray(x) for x in OPS[rule.op](sources, config)]


def _layer_rules(c: TextConfig, i: int, p: str, keys: set[str]) -> list[Rule]:
    """Rules for decoder layer i, whose keys start with `p` (e.g. "model.layers.3.")."""
    h = c.hidden_size
    out = f"layers_{i}/"
    rules: list[Rule] = []

    def add(op: str, sources: list[str], shapes: list[Shape], targets: list[str]) -> None:
        rules.append(Rule(op, tuple(sources), tuple(shapes), tuple(out + t for t in targets)))

    def linear(name: str, target: str, out_features: int, in_features: int, bias: bool = False) -> None:
        add("transpose", [f"{p}{name}.weight"], [(out_features, in_features)], [f"{target}/kernel"])
        if bias:
            add("copy", [f"{p}{name}.bias"], [(out_features,)], [f"{target}/bias"])

    def norm(name: str, dim: int) -> None:
        add("copy", [f"{p}{name}.weight"], [(dim,)], [f"{name.replace('.', '/')}/weight"])

    def mlp(name: str, inter: int) -> None:
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            linear(f"{name}.{proj}", f"{name.replace('.', '/')}/{proj}", *shape)

    norm("input_layernorm", h)
    norm("post_attention_layernorm", h)
    if c.layer_types[i] == LINEAR_ATTENTION:
        hk, hv, dk, dv = (
            c.linear_num_key_heads,
            c.linear_num_value_heads,
            c.linear_key_head_dim,
            c.linear_value_head_dim,
        )
        la = "linear_attn"
        if f"{p}{la}.in_proj_qkvz.weight" in keys:
            add(
                "split_qkvz",
                [f"{p}{la}.in_proj_qkvz.weight"],
                [(2 * hk * dk + 2 * hv * dv, h)],
                [f"{la}/in_proj_qkv/kernel", f"{la}/in_proj_z/kernel"],
            )
            add(
                "split_ba",
                [f"{p}{la}.in_proj_ba.weight"],
                [(2 * hv, h)],
                [f"{la}/in_proj_b/kernel", f"{la}/in_proj_a/kernel"],
            )
        else:
            linear(f"{la}.in_proj_qkv", f"{la}/in_proj_qkv", c.conv_dim, h)
            linear(f"{la}.in_proj_z", f"{la}/in_proj_z", c.value_dim, h)
            linear(f"{la}.in_proj_b", f"{la}/in_proj_b", hv, h)
            linear(f"{la}.in_proj_a", f"{la}/in_proj_a", hv, h)
        add("conv", [f"{p}{la}.conv1d.weight"], [(c.conv_dim, 1, c.linear_conv_kernel_dim)], [f"{la}/conv1d/kernel"])
        add("copy", [f"{p}{la}.A_log"], [(hv,)], [f"{la}/A_log"])
        add("copy", [f"{p}{la}.dt_bias"], [(hv,)], [f"{la}/dt_bias"])
        norm(f"{la}.norm", dv)
        linear(f"{la}.out_proj", f"{la}/out_proj", h, c.value_dim)
    else:
        heads, kv, d, bias = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.attention_bias
        linear("self_attn.q_proj", "self_attn/q_proj", 2 * heads * d, h, bias)
        linear("self_attn.k_proj", "self_attn/k_proj", kv * d, h, bias)
        linear("self_attn.v_proj", "self_attn/v_proj", kv * d, h, bias)
        linear("self_attn.o_proj", "self_attn/o_proj", h, heads * d, bias)
        norm("self_attn.q_norm", d)
        norm("self_attn.k_norm", d)

    if not c.moe_layers[i]:
        mlp("mlp", c.intermediate_size)
        return rules
    e, inter = c.num_experts, c.moe_intermediate_size
    linear("mlp.gate", "mlp/gate", e, h)
    if f"{p}mlp.experts.gate_up_proj" in keys:
        add("transpose", [f"{p}mlp.experts.gate_up_proj"], [(e, 2 * inter, h)], ["mlp/experts/gate_up_proj"])
        add("transpose", [f"{p}mlp.experts.down_proj"], [(e, h, inter)], ["mlp/experts/down_proj"])
    else:
        gate_up = [f"{p}mlp.experts.{j}.{proj}.weight" for j in range(e) for proj in ("gate_proj", "up_proj")]
        add("stack_gate_up", gate_up, [(inter, h)] * (2 * e), ["mlp/experts/gate_up_proj"])
        down = [f"{p}mlp.experts.{j}.down_proj.weight" for j in range(e)]
        add("stack_transpose", down, [(h, inter)] * e, ["mlp/experts/down_proj"])
    if c.shared_expert_intermediate_size:
        mlp("mlp.shared_expert", c.shared_expert_intermediate_size)
        linear("mlp.shared_expert_gate", "mlp/shared_expert_gate", 1, h)
    return rules


@dataclasses.dataclass(frozen=True)
class Plan:
    rules: list[Rule]
    mtp_keys: list[str]  # kept as-is in the separate `mtp` tree
    set_aside: list[str]  # vision tower keys, not converted yet


def plan(config: ModelConfig, keys: list[str]) -> Plan:
    """Rules for every text tensor; raises `MappingError` naming unknown or missing keys."""
    key_set = set(keys)
    # A text-only model may carry the VL prefix (a CausalLM loaded from a VL checkpoint saves it) and vice versa.
    prefixes = [config.text_prefix, "model.language_model.", "model."]
    prefix = next((p for p in prefixes if f"{p}embed_tokens.weight" in key_set), None)
    if prefix is None:
        raise MappingError("no embed_tokens.weight under model. or model.language_model.")
    c = config.text
    h = c.hidden_size
    rules = [
        Rule("copy", (f"{prefix}embed_tokens.weight",), ((c.vocab_size, h),), ("embed_tokens/embedding",)),
        Rule("copy", (f"{prefix}norm.weight",), ((h,),), ("norm/weight",)),
    ]
    for i in range(c.num_hidden_layers):
        rules += _layer_rules(c, i, f"{prefix}layers.{i}.", key_set)
    if not c.tie_word_embeddings:
        rules.append(Rule("transpose", ("lm_head.weight",), ((c.vocab_size, h),), ("lm_head/kernel",)))
    mtp = sorted(k for k in keys if k.startswith("mtp."))
    set_aside = sorted(k for k in keys if k.startswith("model.visual."))
    used = {s for r in rules for s in r.sources} | set(mtp) | set(set_aside)
    if c.tie_word_embeddings:
        used.add("lm_head.weight")  # a tied head may be saved too; the embedding is the one used
    unknown = sorted(key_set - used)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise MappingError(f"unknown tensor key(s) for this config: {', '.join(unknown[:5])}{more}")
    missing = sorted({s for r in rules for s in r.sources} - key_set)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise MappingError(f"missing tensor(s) the config requires: {', '.join(missing[:5])}{more}")
    return Plan(rules, mtp, set_aside)
