"""Plan a sharded deployment without weights: `python -m qwen_jax.plan --config NAME_OR_PATH --mesh "fsdp=8,expert=8"`.

Builds the model abstractly (shapes and shardings only) on a mesh of simulated devices, ahead-of-time compiles the
generation programs (the chunked prefill of the longest prompt of whole prefill pieces that leaves a slot to decode
into a `--context`-slot cache, and one decode step), and reports per device:
- memory for parameters and the cache, exactly, from shapes and shardings (so the figures hold on TPU and GPU
  targets although the compile runs here), and for activations an estimate: the compiled programs' temporary
  buffers (XLA's buffer assignment for this host);
- FLOPs and bytes accessed per token, from the compiled cost analysis. XLA counts a loop body once whatever its trip
  count, so these come from loop-free variants: one prefill piece / one decode token through the embedding and head
  alone, and through each segment's layer pattern once (`unroll_loops`), scaled by the segment's repeats;
- compile time of each program.
The programs compile in float32 and their byte figures are scaled to `--dtype` (`FLOAT32_NOTE` says why).

NAME_OR_PATH: a file name in `configs/` (with or without `.json`), a config.json, or a checkpoint directory.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _parse_args(argv: list[str] | None) -> Any:
    from qwen_jax.errors import OneLineArgumentParser

    p = OneLineArgumentParser(prog="python -m qwen_jax.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a name in configs/, a config.json or a checkpoint directory")
    p.add_argument("--mesh", required=True, help='mesh axes and sizes, e.g. "fsdp=8,expert=8"')
    p.add_argument("--batch", type=int, default=1, help="rows generated together (default 1)")
    p.add_argument("--context", type=int, default=4096, help="cache slots: prompt + new tokens (default 4096)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill piece (default: generation's)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and activations")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = p.parse_args(argv)
    for name in ("batch", "context"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.context < 2:
        p.error("--context must be >= 2 (a prompt and a slot to decode into)")
    chunk = args.prefill_chunk
    if chunk is not None and (chunk < 1 or chunk & (chunk - 1)):
        p.error(f"--prefill-chunk must be a power of two, got {chunk}")
    return args


def resolve_config_path(name: str) -> Path:
    from qwen_jax.errors import InputError

    candidates = [Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.json"]
    for path in candidates:
        if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
            return path
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
    raise InputError(f"no config {name!r}: not a file, a checkpoint directory, or a name in configs/ ({known})")


def _use_simulated_devices(count: int) -> None:
    """Ask XLA for `count` host devices (only possible before jax starts)."""
    if "jax" in sys.modules:
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `jax.ShapeDtypeStruct`s (the most loaded device)."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * x.dtype.itemsize
    return total


def _cost(compiled: Any) -> dict:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return {"flops": float(analysis.get("flops", 0.0)), "bytes": float(analysis.get("bytes accessed", 0.0))}


def _sharded(tree: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def prompt_length(context: int, piece: int) -> int:
    """The prompt the plan prefills: the longest whole number of `piece`s that leaves a slot to decode into."""
    return (context - 1) // piece * piece


FLOAT32_NOTE = """XLA:CPU has no bfloat16 matmul: it converts whole weight tensors to float32 first, which its cost
and memory analyses count as FLOPs, traffic and temporary buffers that a TPU or GPU does not have. So the compiled
programs are built in float32; FLOPs do not depend on the dtype, and bytes accessed and temporary bytes are scaled
by the planned dtype's size (an estimate: the float32 delta-net state and norm weights do not shrink)."""


class Planner:
    """Abstract sharded params, cache and inputs for one config on one mesh."""

    def __init__(self, text_config: Any, mesh: Any, batch: int, context: int, dtype: Any, vision: Any = None):
        import jax.numpy as jnp

        from qwen_jax.sharding import batch_divisor

        self.config, self.mesh, self.dtype, self.context = text_config, mesh, jnp.dtype(dtype), context
        self.batch = -(-batch // batch_divisor(mesh)) * batch_divisor(mesh)  # padded as generation pads it
        self.vision = vision
        self.params, self.cache = self.abstract_state(text_config, self.dtype, vision)

    def abstract_state(self, config: Any, dtype: Any, vision: Any = None) -> tuple[Any, Any]:
        """(parameters, an empty generation cache of `context` slots) of `config` as sharded abstract arrays."""
        import jax

        from qwen_jax.cache import cache_logical_axes, init_cache
        from qwen_jax.model import abstract_params
        from qwen_jax.sharding import tree_shardings

        params = abstract_params(config, dtype, self.mesh, vision)
        cache = jax.eval_shape(lambda: init_cache(config, self.batch, self.context, dtype))
        return params, _sharded(cache, tree_shardings(cache, cache_logical_axes(cache), self.mesh))

    def rows(self, dtype: Any, *shape: int, batch_axis: int = 0) -> Any:
        """An abstract input with the batch at `batch_axis` of `shape` (inserted there), split over the data axes."""
        import jax

        from qwen_jax.sharding import batch_sharding

        full = (*shape[:batch_axis], self.batch, *shape[batch_axis:])
        return jax.ShapeDtypeStruct(full, dtype, sharding=batch_sharding(self.mesh, len(full), batch_axis))

    def tokens(self, length: int) -> Any:
        """`[batch, length]` int32 (ids, or a mask)."""
        import jax.numpy as jnp

        return self.rows(jnp.int32, length)

    def positions(self, length: int) -> Any:
        """`[batch, length]`, or `[3, batch, length]` for MRoPE models."""
        import jax.numpy as jnp

        if self.config.rope.mrope_section is None:
            return self.rows(jnp.int32, length)
        return self.rows(jnp.int32, 3, length, batch_axis=1)

    def compile_generation(self, piece: int) -> dict:
        """AOT-compile the real prefill (the prompt in pieces) and decode step in float32 (see `FLOAT32_NOTE`);
        their compile times and temporary bytes, the latter scaled to the planned dtype."""
        import jax
        import jax.numpy as jnp

        from qwen_jax.generation import GenerationSettings, Prompt, _jit_prefill, _jit_step
        from qwen_jax.sampling import SamplingConfig

        params, cache = self.abstract_state(self.config, jnp.float32)
        length = prompt_length(self.context, piece)
        prompt = Prompt(self.tokens(length), self.tokens(length), self.positions(length), None, None)
        settings = GenerationSettings(SamplingConfig(), 1, (), 0, 0)
        vocab = self.config.vocab_size
        # _jit_step(params, cache, token, positions, seen, generated, done, rng, step): decode positions are [batch].
        step_args = (params, cache, self.rows(jnp.int32), self.rows(jnp.int32), self.rows(bool, vocab),
                     self.rows(bool, vocab), self.rows(bool), jax.eval_shape(lambda: jax.random.key(0)),
                     jax.ShapeDtypeStruct((), jnp.int32))  # fmt: skip
        out = {}
        with jax.set_mesh(self.mesh):
            for name, fn, args, static in (
                ("prefill", _jit_prefill, (params, prompt), {"config": self.config, "max_len": self.context, "piece": piece}),
                ("decode", _jit_step, step_args, {"config": self.config, "settings": settings}),
            ):  # fmt: skip
                start = time.perf_counter()
                compiled = fn.lower(*args, **static).compile()
                memory = compiled.memory_analysis()
                temp = int(getattr(memory, "temp_size_in_bytes", 0) or 0) * self.dtype.itemsize / 4
                out[name] = {"compile_s": time.perf_counter() - start, "temp_bytes": int(temp)}
        return out

    def cost_per_token(self, piece: int) -> dict:
        """FLOPs and bytes per token (per device) of a prefill piece and of a decode step, from loop-free
        variants (float32, see `FLOAT32_NOTE`): the model without layers, plus each segment's pattern once times
        its repeats."""
        from qwen_jax.layers.delta_rule import ACCELERATOR_CHUNK
        from qwen_jax.stacking import layer_segments

        segments = layer_segments(self.config)
        # The delta rule's chunk of the TPU / GPU target, not of this host's CPU.
        unrolled = self.config.replace(unroll_loops=True, chunk_size=self.config.chunk_size or ACCELERATOR_CHUNK)

        def variant(layers: tuple[int, ...]) -> Any:
            c = unrolled.replace(
                num_hidden_layers=len(layers),
                layer_types=tuple(self.config.layer_types[i] for i in layers),
                moe_layers=tuple(self.config.moe_layers[i] for i in layers),
            )
            return c

        results = {}
        for phase, tokens in (("prefill", piece), ("decode", 1)):
            base = self._cost_of(variant(()), tokens)
            total = dict(base)
            for s in segments:
                once = self._cost_of(variant(tuple(s.layer(0, j) for j in range(s.period))), tokens)
                for key in total:
                    total[key] += s.count * (once[key] - base[key])
            scale = {"flops": 1.0, "bytes": self.dtype.itemsize / 4}
            results[phase] = {key: value * scale[key] / (tokens * self.batch) for key, value in total.items()}
        return results

    def _cost_of(self, config: Any, tokens: int) -> dict:
        import jax
        import jax.numpy as jnp

        from qwen_jax.model import forward_with_cache

        params, cache = self.abstract_state(config, jnp.float32)
        ids, mask, positions = self.tokens(tokens), self.tokens(tokens), self.positions(tokens)

        def step(params, cache, ids, mask, positions):
            return forward_with_cache(params, config, ids, positions, cache, mask, last_only=True)  # as generation

        with jax.set_mesh(self.mesh):
            compiled = jax.jit(step).lower(params, cache, ids, mask, positions).compile()
        return _cost(compiled)


def plan(config_path: Path, mesh_spec: str, batch: int, context: int, dtype: str, piece: int | None = None) -> dict:
    """The report as a dict (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from qwen_jax.config import load_config
    from qwen_jax.errors import InputError
    from qwen_jax.generation import PREFILL_CHUNK
    from qwen_jax.sharding import make_mesh, parse_mesh_spec

    config = load_config(config_path)
    devices = math.prod(parse_mesh_spec(mesh_spec).values())
    if jax.device_count() < devices:
        raise InputError(f"mesh {mesh_spec!r} needs {devices} devices; this process has {jax.device_count()}")
    mesh = make_mesh(mesh_spec, jax.devices()[:devices])
    if context < 2:
        raise InputError(f"--context {context} leaves no slot to decode into")
    piece = min(piece or PREFILL_CHUNK, 1 << ((context - 1).bit_length() - 1))  # a power of two <= context - 1
    planner = Planner(config.text, mesh, batch, context, jnp.dtype(dtype), config.vision)
    compiled = planner.compile_generation(piece)
    cost = planner.cost_per_token(piece)
    memory = {
        "params": _per_device_bytes(planner.params),
        "cache": _per_device_bytes(planner.cache),
        "activations_prefill_estimate": compiled["prefill"]["temp_bytes"],
        "activations_decode_estimate": compiled["decode"]["temp_bytes"],
    }
    return {
        "config": str(config_path), "model_type": config.model_type, "mesh": dict(mesh.shape), "devices": devices,
        "batch": planner.batch, "context": context, "dtype": dtype, "prefill_piece": piece,
        "per_device_bytes": memory,
        "per_token_per_device": {f"{phase}_{key}": cost[phase][key] for phase in cost for key in ("flops", "bytes")},
        "compile_s": {"prefill": compiled["prefill"]["compile_s"], "decode": compiled["decode"]["compile_s"]},
    }  # fmt: skip


def _human(x: float, unit: str, base: float = 1000.0) -> str:
    """1536 B -> "1.50 KiB" (base 1024) / 2.5e9 FLOP -> "2.50 GFLOP"."""
    prefixes = ("", "Ki", "Mi", "Gi", "Ti") if base == 1024 else ("", "k", "M", "G", "T")
    for prefix in prefixes:
        if abs(x) < base or prefix == prefixes[-1]:
            return f"{x:.2f} {prefix}{unit}" if prefix else f"{x:.0f} {unit}"
        x /= base
    raise AssertionError


def format_report(r: dict) -> str:
    mem, tok, comp = r["per_device_bytes"], r["per_token_per_device"], r["compile_s"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    size = lambda b: _human(b, "B", 1024)
    lines = [
        (f"{Path(r['config']).stem} ({r['model_type']}) on {mesh}: batch {r['batch']}, context {r['context']}, "
         f"{r['dtype']}, prefill pieces of {r['prefill_piece']}"),
        "per device:",
        f"  parameters   {size(mem['params']):>12}",
        f"  cache        {size(mem['cache']):>12}",
        (f"  activations  {size(mem['activations_prefill_estimate']):>12} prefill, "
         f"{size(mem['activations_decode_estimate'])} decode (estimated)"),
    ]  # fmt: skip
    for phase in ("prefill", "decode"):
        flops, moved = _human(tok[f"{phase}_flops"], "FLOP"), _human(tok[f"{phase}_bytes"], "B")
        lines.append(f"  {phase:<12} {flops:>12} / token, {moved} accessed / token")
    lines.append(f"compile: prefill {comp['prefill']:.1f} s, decode {comp['decode']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from qwen_jax.errors import InputError
    from qwen_jax.mesh_spec import parse_mesh_spec

    try:
        path = resolve_config_path(args.config)
        _use_simulated_devices(max(1, math.prod(parse_mesh_spec(args.mesh).values())))
        from qwen_jax import runtime

        runtime.setup(cache=False)
        report = plan(path, args.mesh, args.batch, args.context, args.dtype, args.prefill_chunk)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
