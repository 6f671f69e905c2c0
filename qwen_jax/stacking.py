"""How the decoder layers are grouped for `lax.scan`, and the stacked layout of their parameters and cache.

The layer pattern repeats (Qwen3.5: three Gated DeltaNet layers, then one full-attention layer), so the decoder runs
as a scan over repeats of the pattern: compile time stays that of one repeat whatever the depth. A `Segment` is
`count` consecutive repeats of one `period`-layer pattern of (layer type, MoE or dense) kinds; most models are one
segment. An irregular stack (Qwen3-Next's `mlp_only_layers`, a depth that is not a multiple of the period) becomes
several segments, each its own scan. With `TextConfig.scan_layers` False (the CPU default, `default_scan_layers`)
every repeat is a segment of its own: one array per layer, read in place, for a compile time that grows with depth.

Two layouts of the same decoder parameters:
- storage: `layers_{i}/...` per layer, as on disk and in the reference (`qwen_jax.checkpoint`, the converter);
- stacked (what the model computes with): `layers[segment][position]/...`, each leaf with a leading `[count]` axis,
  holding layers `segment.layer(0, position), segment.layer(1, position), ...`, with the delta-net input
  projections fused (`qwen_jax.layers.fused_projections`).
The cache uses the stacked layout too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qwen_jax.config import TextConfig
from qwen_jax.layers.fused_projections import fuse_layer, split_layer

STACKED = "layers"


class Segment(NamedTuple):
    """Layers `start + cycle * period + position` for `cycle < count`, `position < period`."""

    start: int
    period: int
    count: int

    def layer(self, cycle: int, position: int) -> int:
        return self.start + cycle * self.period + position


def layer_period(config: TextConfig) -> int:
    """The shortest period of the layer-type pattern (4 for 3 linear + 1 full; 1 for all full attention)."""
    types = config.layer_types
    n = len(types)
    return next((p for p in range(1, n + 1) if all(types[i] == types[i + p] for i in range(n - p))), 1)


def default_scan_layers() -> bool:
    """Scan over the stacked layers except on CPU. On XLA:CPU a scan copies each layer's weights out of the stack
    before its matmuls read them, and matrix-vector products (decode) are bound by those reads: batch-1 decode of the
    issue-6 model took ~16 ms a token scanned, ~10.7 ms with a segment per repeat (2-core AMD EPYC). Accelerators
    fuse such slices into their matmuls, and a scan keeps compile time that of one repeat."""
    return jax.default_backend() != "cpu"


def layer_segments(config: TextConfig) -> tuple[Segment, ...]:
    """The decoder as runs of identical repeats of its layer pattern, in order, covering every layer once; with
    `config.scan_layers` False, each repeat a segment of its own."""
    kinds = list(zip(config.layer_types, config.moe_layers))
    n, period = len(kinds), layer_period(config)
    segments, start = [], 0
    while start < n:
        p = min(period, n - start)
        pattern, count = kinds[start : start + p], 1
        while start + (count + 1) * p <= n and kinds[start + count * p : start + (count + 1) * p] == pattern:
            count += 1
        if config.scan_layers:
            segments.append(Segment(start, p, count))
        else:
            segments += [Segment(start + cycle * p, p, 1) for cycle in range(count)]
        start += count * p
    return tuple(segments)


def is_stacked(params: Any) -> bool:
    return STACKED in params


def stack_layers(params: dict, config: TextConfig) -> dict:
    """Storage layout -> stacked layout (copies the layer weights; `qwen_jax.load` builds the stacked layout
    directly instead). Other entries pass through."""
    if is_stacked(params):
        return params
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out[STACKED] = tuple(
        tuple(
            fuse_layer(
                jax.tree.map(lambda *xs: jnp.stack(xs), *(params[f"layers_{s.layer(c, j)}"] for c in range(s.count))),
                config,
            )
            for j in range(s.period)
        )
        for s in layer_segments(config)
    )
    return out


def unstack_layers(params: dict, config: TextConfig) -> dict:
    """Stacked layout -> storage layout (`layers_{i}` per layer)."""
    if not is_stacked(params):
        return params
    out = {k: v for k, v in params.items() if k != STACKED}
    for segment, stacked in zip(layer_segments(config), params[STACKED]):
        for j, tree in enumerate(stacked):
            tree = split_layer(tree, config)
            for c in range(segment.count):
                out[f"layers_{segment.layer(c, j)}"] = jax.tree.map(lambda x, c=c: x[c], tree)
    return out


def layer_params(params: dict, config: TextConfig, index: int) -> Any:
    """The parameters of decoder layer `index`, from either layout."""
    if not is_stacked(params):
        return params[f"layers_{index}"]
    for segment, stacked in zip(layer_segments(config), params[STACKED]):
        cycle, position = divmod(index - segment.start, segment.period)
        if 0 <= cycle < segment.count:
            return split_layer(jax.tree.map(lambda x, cycle=cycle: x[cycle], stacked[position]), config)
    raise IndexError(f"no decoder layer {index}")


def stacked_logical_axes(names: Any) -> Any:
    """Logical axis names of a stacked leaf: the layer axis (never split) before the layer's own names."""
    return jax.tree.map(lambda n: (None, *n), names, is_leaf=lambda x: isinstance(x, tuple))
