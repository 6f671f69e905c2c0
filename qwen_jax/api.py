"""`load` a converted model directory into a `Model`: its config, its parameters (optionally sharded over a device
mesh) and a jitted forward."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.checkpoint.format import PARAMS_DIR, cast_tree, param_groups, read_metadata
from qwen_jax.config import ModelConfig, load_config
from qwen_jax.layers.fused_projections import fuse_layer
from qwen_jax.model import forward, stacked_param_shardings, text_params
from qwen_jax.stacking import default_scan_layers


@functools.partial(jax.jit, static_argnames=("config",))
def _jitted_forward(params, config, input_ids, attention_mask, positions, visual):
    return forward(params, config, input_ids, attention_mask, positions, visual)


class Model:
    """A loaded model. `model(input_ids, attention_mask=None, ...)` -> logits `[batch, seq, vocab]` float32.

    Vision-language checkpoints also take the processor's outputs: `pixel_values` + `image_grid_thw`,
    `pixel_values_videos` + `video_grid_thw`, and optionally `mm_token_type_ids` (derived from the placeholder
    tokens when absent); positions are then the 3D MRoPE positions. With a mesh, the batch is split over its data
    axes (padded to a multiple of their size) and the MoE runs expert-parallel.
    """

    def __init__(self, config: ModelConfig, params: Any, path: Path | None = None, mesh: Any = None):
        self.config = config
        self.params = params
        self.path = path
        self.mesh = mesh

    def activate(self) -> contextlib.AbstractContextManager:
        """Context in which jitted calls see this model's mesh (a no-op without one)."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any | None = None,
        positions: Any | None = None,
        *,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        pixel_values_videos: Any = None,
        video_grid_thw: Any = None,
        mm_token_type_ids: Any = None,
    ) -> jax.Array:
        from qwen_jax.multimodal import positions_for, visual_inputs

        ids = np.asarray(input_ids)
        batch = ids.shape[0]
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
        with self.activate():
            visual = visual_inputs(
                self.params, self.config, ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
            if positions is None:
                positions, _ = positions_for(self.config, ids, mask, image_grid_thw, video_grid_thw, mm_token_type_ids)
            ids, mask, positions, visual = self._place_batch(ids, mask, np.asarray(positions), visual)
            logits = _jitted_forward(self.params, self.config.text, ids, mask, positions, visual)
        return logits[:batch]

    def _place_batch(self, ids, mask, positions, visual):
        """Pad the batch to a multiple of the mesh's data axes and shard it over them."""
        if self.mesh is None:
            return jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(positions, jnp.int32), visual
        from qwen_jax.sharding import batch_divisor, batch_sharding

        pad = (-ids.shape[0]) % batch_divisor(self.mesh)

        def place(x, batch_axis):
            x = jnp.asarray(x)
            widths = [(0, 0)] * x.ndim
            widths[batch_axis] = (0, pad)
            return jax.device_put(jnp.pad(x, widths), batch_sharding(self.mesh, x.ndim, batch_axis))

        positions_axis = positions.ndim - 2
        if visual is not None:
            visual = type(visual)(place(visual.mask, 0), place(visual.values, 0), place(visual.deepstack, 1))
        return place(ids.astype(np.int32), 0), place(mask, 0), place(positions.astype(np.int32), positions_axis), visual

    def __repr__(self) -> str:
        return f"Model({self.config.model_type}, {self.config.text.num_hidden_layers} layers, path={self.path})"


def load(path: str | Path, dtype: Any = None, mesh: Any = None, scan_layers: bool | None = None) -> Model:
    """Load a model directory written by `tools/convert.py`.

    dtype: cast the weights (e.g. `jnp.bfloat16`); None keeps the stored dtypes. `A_log`, `dt_bias` and norm weights
    stay float32 either way. Activations compute in the embedding's dtype.
    mesh: a `jax.sharding.Mesh` (axes among data, fsdp, tensor, expert) or a spec string such as "data=2,expert=4":
    every array is restored straight into its sharding (see `qwen_jax.sharding`).
    scan_layers: run the decoder as a scan over stacked repeats of its layer pattern, or each repeat apart
    (`TextConfig.scan_layers`); None: the backend's choice (`qwen_jax.stacking.default_scan_layers`).

    The decoder layers are restored one at a time into their place in the stacked layout (`qwen_jax.stacking`), so
    loading needs memory for the model plus one layer.
    """
    path = Path(path)
    read_metadata(path)
    config = load_config(path)
    if scan_layers is None:
        scan_layers = default_scan_layers()
    config = config.replace(text=config.text.replace(scan_layers=scan_layers))
    if mesh is not None:
        from qwen_jax.sharding import make_mesh

        mesh = make_mesh(mesh)
    params = _restore(path / PARAMS_DIR, config, mesh, None if dtype is None else jnp.dtype(dtype))
    return Model(config, params, path, mesh)


@functools.partial(jax.jit, donate_argnums=0)
def _place_layer(stacked: Any, layer: Any, index: jax.Array) -> Any:
    return jax.tree.map(lambda buffer, x: buffer.at[index].set(x.astype(buffer.dtype)), stacked, layer)


def _empty_stack(layer: Any, count: int, mesh: Any) -> Any:
    """Zeros `[count, ...]` for each leaf of one layer's tree, sharded like the leaf with the layer axis whole."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def empty(x):
        sharding = None if mesh is None else NamedSharding(mesh, P(None, *x.sharding.spec))
        return jnp.zeros((count, *x.shape), x.dtype, device=sharding)

    return jax.tree.map(empty, layer)


def _restore(directory: Path, config: ModelConfig, mesh: Any, dtype: Any) -> Any:
    """The parameters in the stacked layout, each array restored into its sharding on `mesh` (if given) and cast
    to `dtype` (if given; see `cast_tree`)."""
    import orbax.checkpoint as ocp

    from qwen_jax.model import param_logical_axes
    from qwen_jax.sharding import tree_shardings
    from qwen_jax.stacking import STACKED, layer_segments

    names = None
    if mesh is not None:
        names = param_logical_axes(config.text)
        if config.vision is not None:
            from qwen_jax.vision import vision_logical_axes

            names["visual"] = vision_logical_axes(config.vision)

    def plain(node: Any) -> Any:  # orbax returns its own mapping types
        if isinstance(node, Mapping):
            return {k: plain(v) for k, v in node.items()}
        return jax.ShapeDtypeStruct(tuple(node.shape), node.dtype) if hasattr(node, "shape") else node

    with ocp.StandardCheckpointer() as checkpointer:

        def read(group: str) -> Any:
            location = (directory / group).absolute()
            target = None
            if mesh is not None:
                stored = checkpointer.metadata(location).item_metadata
                stored = plain(getattr(stored, "tree", stored))
                shardings = tree_shardings(stored, names[group], mesh)
                target = jax.tree.map(
                    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), stored, shardings
                )
            tree = jax.tree.map(jnp.asarray, checkpointer.restore(location, target))
            return tree if dtype is None else cast_tree(tree, dtype, f"{group}/")

        params = {group: read(group) for group in param_groups(directory) if not group.startswith("layers_")}
        stacked = []
        for segment in layer_segments(config.text):
            positions = []
            for j in range(segment.period):
                buffer = None
                for cycle in range(segment.count):
                    layer = read(f"layers_{segment.layer(cycle, j)}")
                    buffer = _empty_stack(layer, segment.count, mesh) if buffer is None else buffer
                    buffer = _place_layer(buffer, layer, jnp.int32(cycle))
                    del layer
                positions.append(fuse_layer(buffer, config.text))
            stacked.append(tuple(positions))
        params[STACKED] = tuple(stacked)
    if mesh is not None:  # the fused projections into their own sharding
        params = dict(
            params,
            **jax.device_put(text_params(params), stacked_param_shardings(text_params(params), config.text, mesh)),
        )
    return params
