"""The one table between Hugging Face checkpoint keys and this library's parameter tree.

`plan(config, keys)` lists `Rule`s: which source tensors (with the shapes the config implies) become which parameter
paths through which layout op. Every layout that exists in practice maps onto one internal layout:
- linear `weight [out, in]` -> `kernel [in, out]`; conv `[channels, 1, K]` -> `[K, channels]`;
- Qwen3-Next fused `in_proj_qkvz` / `in_proj_ba` (grouped per key head) -> split `in_proj_qkv, z, b, a`;
- per-expert `experts.{e}.{gate,up,down}_proj.weight` or fused `experts.gate_up_proj [E, 2I, H]`,
  `experts.down_proj [E, H, I]` -> `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`.
The ops are plain numpy, each with its inverse (`OPS`), so the exporter reads the same rules backwards.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from qwen_jax.config import LINEAR_ATTENTION, ModelConfig, TextConfig, VisionConfig
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
    return parts[-1] in ("A_log", "dt_bias") or (parts[-1] in ("weight", "scale", "bias") and "norm" in parts[-2])


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


def _ungrouped(parts: list[np.ndarray], groups: int) -> np.ndarray:
    """Inverse of `_grouped`: parts `[groups * size_i, in]` -> `[groups * sum(sizes), in]`, each group's rows
    holding its slice of every part in turn."""
    return np.concatenate([x.reshape(groups, -1, x.shape[-1]) for x in parts], axis=1).reshape(-1, parts[0].shape[-1])


def _join_qkvz(qkv: np.ndarray, z: np.ndarray, c: TextConfig) -> list[np.ndarray]:
    """Inverse of `_split_qkvz`: kernels `qkv [in, conv_dim]`, `z [in, value_dim]` -> `in_proj_qkvz [out, in]`."""
    qk = c.linear_num_key_heads * c.linear_key_head_dim
    q, k, v = np.split(qkv.T, [qk, 2 * qk])
    return [_ungrouped([q, k, v, z.T], c.linear_num_key_heads)]


@dataclasses.dataclass(frozen=True)
class Op:
    """A layout op and its inverse: `forward(sources, config)` -> targets, `inverse(targets, config,
    source_shapes)` -> sources, so that `inverse(forward(xs)) == xs` bit for bit."""

    forward: Callable[[list[np.ndarray], TextConfig], list[np.ndarray]]
    inverse: Callable[[list[np.ndarray], TextConfig, tuple[Shape, ...]], list[np.ndarray]]


OPS: dict[str, Op] = {
    "copy": Op(lambda xs, c: [xs[0]], lambda ys, c, shapes: [ys[0]]),
    "transpose": Op(lambda xs, c: [np.swapaxes(xs[0], -1, -2)], lambda ys, c, shapes: [np.swapaxes(ys[0], -1, -2)]),
    "conv": Op(lambda xs, c: [xs[0][:, 0, :].T], lambda ys, c, shapes: [ys[0].T[:, None, :]]),
    "split_qkvz": Op(lambda xs, c: _split_qkvz(xs[0], c), lambda ys, c, shapes: _join_qkvz(ys[0], ys[1], c)),
    "split_ba": Op(
        lambda xs, c: _split_ba(xs[0], c),
        lambda ys, c, shapes: [_ungrouped([ys[0].T, ys[1].T], c.linear_num_key_heads)],
    ),
    "stack_gate_up": Op(
        lambda xs, c: [np.stack([np.concatenate(xs[i : i + 2]).T for i in range(0, len(xs), 2)])],
        lambda ys, c, shapes: [half for expert in ys[0] for half in np.split(expert.T, 2)],  # gate_e, up_e, ...
    ),
    "stack_transpose": Op(lambda xs, c: [np.stack([x.T for x in xs])], lambda ys, c, shapes: [y.T for y in ys[0]]),
    "flatten_transpose": Op(  # Conv3d patch embedding
        lambda xs, c: [xs[0].reshape(xs[0].shape[0], -1).T], lambda ys, c, shapes: [ys[0].T.reshape(shapes[0])]
    ),
}

# Fused expert tensors: transformers 5.x writes gate_up_proj [E, 2I, H] and down_proj [E, H, I]; the official
# Qwen3-VL-MoE files hold the transposes [E, H, 2I] and [E, I, H].
EXPERT_LAYOUTS = ("v5", "legacy")
FIRST_V5_VERSION = (5, 0)


def apply_rule(rule: Rule, sources: list[np.ndarray], config: TextConfig) -> list[np.ndarray]:
    return [np.ascontiguousarray(x) for x in OPS[rule.op].forward(sources, config)]


def invert_rule(rule: Rule, targets: list[np.ndarray], config: TextConfig) -> list[np.ndarray]:
    """The source tensors of `rule` (in its `sources` order) rebuilt from its target parameters."""
    return [np.ascontiguousarray(x) for x in OPS[rule.op].inverse(targets, config, rule.source_shapes)]


def _layer_rules(c: TextConfig, i: int, p: str, keys: set[str], expert_layout: str) -> list[Rule]:
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
        q_width = heads * d * (2 if c.attention_output_gate else 1)
        linear("self_attn.q_proj", "self_attn/q_proj", q_width, h, bias)
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
        if expert_layout == "v5":
            add("transpose", [f"{p}mlp.experts.gate_up_proj"], [(e, 2 * inter, h)], ["mlp/experts/gate_up_proj"])
            add("transpose", [f"{p}mlp.experts.down_proj"], [(e, h, inter)], ["mlp/experts/down_proj"])
        else:
            add("copy", [f"{p}mlp.experts.gate_up_proj"], [(e, h, 2 * inter)], ["mlp/experts/gate_up_proj"])
            add("copy", [f"{p}mlp.experts.down_proj"], [(e, inter, h)], ["mlp/experts/down_proj"])
    else:
        gate_up = [f"{p}mlp.experts.{j}.{proj}.weight" for j in range(e) for proj in ("gate_proj", "up_proj")]
        add("stack_gate_up", gate_up, [(inter, h)] * (2 * e), ["mlp/experts/gate_up_proj"])
        down = [f"{p}mlp.experts.{j}.down_proj.weight" for j in range(e)]
        add("stack_transpose", down, [(h, inter)] * e, ["mlp/experts/down_proj"])
    if c.shared_expert_intermediate_size:
        mlp("mlp.shared_expert", c.shared_expert_intermediate_size)
        linear("mlp.shared_expert_gate", "mlp/shared_expert_gate", 1, h)
    return rules


def _vision_rules(v: VisionConfig, p: str) -> list[Rule]:
    """Rules for the vision tower, whose keys start with `p` ("model.visual.")."""
    d, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    rules: list[Rule] = []

    def linear(name: str, target: str, out_features: int, in_features: int) -> None:
        weight = (f"{p}{name}.weight",)
        rules.append(Rule("transpose", weight, ((out_features, in_features),), (f"visual/{target}/kernel",)))
        rules.append(Rule("copy", (f"{p}{name}.bias",), ((out_features,),), (f"visual/{target}/bias",)))

    def layer_norm(name: str, target: str, dim: int) -> None:
        for src, dst in (("weight", "scale"), ("bias", "bias")):
            rules.append(Rule("copy", (f"{p}{name}.{src}",), ((dim,),), (f"visual/{target}/{dst}",)))

    def merger(name: str, target: str, norm_dim: int) -> None:
        layer_norm(f"{name}.norm", f"{target}/norm", norm_dim)
        linear(f"{name}.linear_fc1", f"{target}/linear_fc1", merged, merged)
        linear(f"{name}.linear_fc2", f"{target}/linear_fc2", v.out_hidden_size, merged)

    patch_shape = (d, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    patch = (f"{p}patch_embed.proj.weight",)
    rules.append(Rule("flatten_transpose", patch, (patch_shape,), ("visual/patch_embed/kernel",)))
    rules.append(Rule("copy", (f"{p}patch_embed.proj.bias",), ((d,),), ("visual/patch_embed/bias",)))
    rules.append(Rule("copy", (f"{p}pos_embed.weight",), ((v.num_position_embeddings, d),), ("visual/pos_embed",)))
    for j in range(v.depth):
        b = f"blocks.{j}"
        layer_norm(f"{b}.norm1", f"blocks_{j}/norm1", d)
        layer_norm(f"{b}.norm2", f"blocks_{j}/norm2", d)
        linear(f"{b}.attn.qkv", f"blocks_{j}/attn/qkv", 3 * d, d)
        linear(f"{b}.attn.proj", f"blocks_{j}/attn/proj", d, d)
        linear(f"{b}.mlp.linear_fc1", f"blocks_{j}/mlp/linear_fc1", v.intermediate_size, d)
        linear(f"{b}.mlp.linear_fc2", f"blocks_{j}/mlp/linear_fc2", d, v.intermediate_size)
    merger("merger", "merger", d)
    for k in range(len(v.deepstack_visual_indexes)):
        merger(f"deepstack_merger_list.{k}", f"deepstack_merger_list_{k}", merged)
    return rules


def _version(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in str(text).split(".")[:2])
    except ValueError:
        return None


def expert_layout(
    config: TextConfig, shapes: dict[str, Shape], prefix: str, requested: str | None, transformers_version: str | None
) -> str:
    """Which fused expert layout the checkpoint uses ("v5" or "legacy"), by shape where the layouts differ; where
    they cannot be told apart (hidden == 2 * moe_intermediate), from `transformers_version` or `requested`."""
    key = next((k for k in shapes if k.startswith(prefix) and k.endswith("mlp.experts.gate_up_proj")), None)
    if requested is not None:
        if requested not in EXPERT_LAYOUTS:
            raise MappingError(f"unknown expert layout {requested!r} (choose {' or '.join(EXPERT_LAYOUTS)})")
        return requested
    if key is None:
        return "v5"
    e, h, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
    if h != 2 * inter:
        if shapes[key] == (e, 2 * inter, h):
            return "v5"
        if shapes[key] == (e, h, 2 * inter):
            return "legacy"
        return "v5"  # a wrong shape: the shape check names it
    version = _version(transformers_version)
    if config.model_type.startswith("qwen3_5") or config.model_type == "qwen3_next":
        return "v5"  # these families were only ever published in the [E, 2I, H] layout
    if version is None:
        raise MappingError(
            f"{key}: hidden_size == 2 * moe_intermediate_size, so the expert layout cannot be told from shapes, and "
            "config.json records no transformers_version; pass --expert-layout v5 (files written by transformers "
            ">= 5) or legacy (the official Qwen3-VL-MoE release)"
        )
    return "v5" if version >= FIRST_V5_VERSION else "legacy"


@dataclasses.dataclass(frozen=True)
class Plan:
    rules: list[Rule]
    mtp_keys: list[str]  # kept as-is in the separate `mtp` tree
    set_aside: list[str]  # vision keys of a text-only config, not converted
    expert_layout: str


def checkpoint_rules(config: ModelConfig, prefix: str, keys: set[str], expert_layout: str) -> list[Rule]:
    """The rules for every parameter, the text model's keys starting with `prefix` ("model." or
    "model.language_model."). `keys` selects the variants: Qwen3-Next's fused `in_proj_qkvz` where a layer has it,
    fused experts (in `expert_layout`) where a layer has `mlp.experts.gate_up_proj`, per-expert tensors otherwise."""
    c = config.text
    h = c.hidden_size
    rules = [
        Rule("copy", (f"{prefix}embed_tokens.weight",), ((c.vocab_size, h),), ("embed_tokens/embedding",)),
        Rule("copy", (f"{prefix}norm.weight",), ((h,),), ("norm/weight",)),
    ]
    for i in range(c.num_hidden_layers):
        rules += _layer_rules(c, i, f"{prefix}layers.{i}.", keys, expert_layout)
    if not c.tie_word_embeddings:
        rules.append(Rule("transpose", ("lm_head.weight",), ((c.vocab_size, h),), ("lm_head/kernel",)))
    if config.vision is not None:
        rules += _vision_rules(config.vision, "model.visual.")
    return rules


def plan(
    config: ModelConfig,
    shapes: dict[str, Shape],
    requested_expert_layout: str | None = None,
    transformers_version: str | None = None,
) -> Plan:
    """Rules for every tensor of the checkpoint (`shapes`: key -> shape); raises `MappingError` naming unknown or
    missing keys."""
    keys = list(shapes)
    key_set = set(keys)
    # A text-only model may carry the VL prefix (a CausalLM loaded from a VL checkpoint saves it) and vice versa.
    prefixes = [config.text_prefix, "model.language_model.", "model."]
    prefix = next((p for p in prefixes if f"{p}embed_tokens.weight" in key_set), None)
    if prefix is None:
        raise MappingError("no embed_tokens.weight under model. or model.language_model.")
    c = config.text
    layout = expert_layout(c, shapes, prefix, requested_expert_layout, transformers_version)
    rules = checkpoint_rules(config, prefix, key_set, layout)
    set_aside = sorted(k for k in keys if k.startswith("model.visual.")) if config.vision is None else []
    mtp = sorted(k for k in keys if k.startswith("mtp."))
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
    return Plan(rules, mtp, set_aside, layout)
