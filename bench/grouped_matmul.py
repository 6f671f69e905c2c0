"""The MoE's grouped matmul on this machine: our CPU path (`qwen_jax.layers.grouped_matmul`, a tiled scan) against
`jax.lax.ragged_dot` (which XLA:CPU computes densely over every group) and against one plain matmul of all rows with
the same FLOPs (the floor), float32, in one run.

    python bench/grouped_matmul.py [--rows 16384] [--groups 64] [--hidden 512] [--out 512]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.layers.grouped_matmul import _tiled_grouped_matmul, tile_rows


def seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--out", type=int, default=512)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((a.rows, a.hidden)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((a.groups, a.hidden, a.out)), jnp.float32)
    sizes = jnp.asarray(np.bincount(rng.integers(0, a.groups, a.rows), minlength=a.groups), jnp.int32)
    tile = tile_rows(a.rows, a.groups)
    ours = seconds(jax.jit(functools.partial(_tiled_grouped_matmul, tile=tile)), x, w, sizes)
    ragged = seconds(jax.jit(jax.lax.ragged_dot), x, w, sizes)
    floor = seconds(jax.jit(lambda x, w: x @ w[0]), x, w)
    result = {"rows": a.rows, "groups": a.groups, "hidden": a.hidden, "out": a.out, "tile": tile,
              "ours_s": ours, "ragged_dot_s": ragged, "one_matmul_s": floor,
              "ragged_dot_over_ours": ragged / ours, "ours_over_one_matmul": ours / floor}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
