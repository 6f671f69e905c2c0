"""Run in a fresh interpreter with 8 simulated CPU devices: the expert-parallel MoE's two token exchanges against
the single-device dispatch, forward and gradients, on several meshes and routings. Prints one JSON line per case
and exits non-zero on the first failure. Last, the all-to-all program is exported for TPU (it lowers to the real
`ragged_all_to_all` there)."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qwen_jax.layers.moe import choose_exchange, expert_parallel, routed_experts  # noqa: E402
from qwen_jax.sharding import make_mesh  # noqa: E402

EXPERTS, K, HIDDEN, INTER = 16, 2, 24, 20


def inputs(seed: int, tokens: int, skewed: bool):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
    chosen = np.stack([rng.choice(EXPERTS, K, replace=False) for _ in range(tokens)])
    if skewed:  # every token's first choice is expert 5 (one device gets every token)
        chosen[:, 0] = 5
        chosen[:, 1] = np.where(chosen[:, 1] == 5, 6, chosen[:, 1])
    weights = rng.random((tokens, K)).astype(np.float32)
    gate_up = (rng.standard_normal((EXPERTS, HIDDEN, 2 * INTER)) * 0.3).astype(np.float32)
    down = (rng.standard_normal((EXPERTS, INTER, HIDDEN)) * 0.3).astype(np.float32)
    return x, weights, chosen.astype(np.int32), gate_up, down


def loss_and_grads(fn, x, weights, experts, gate_up, down):
    cotangent = jnp.asarray(np.random.default_rng(9).standard_normal((x.shape[0], HIDDEN)), jnp.float32)
    loss = lambda x, w, gu, dn: jnp.sum(fn(x, w, experts, gu, dn) * cotangent)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, weights, gate_up, down)


def main() -> None:
    for mesh_spec in ("expert=8", "data=2,expert=4"):
        mesh = make_mesh(mesh_spec)
        for tokens, skewed in ((256, False), (256, True), (72, False)):
            args = inputs(tokens + skewed, tokens, skewed)
            single = loss_and_grads(routed_experts, *args)
            for exchange in ("all_to_all", "all_reduce"):
                with jax.set_mesh(mesh):
                    ours = loss_and_grads(functools.partial(expert_parallel, exchange=exchange), *args)
                errors = [float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-30))
                          for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(single))]  # fmt: skip
                result = {"mesh": mesh_spec, "tokens": tokens, "skewed": skewed, "exchange": exchange,
                          "max_relative_error": max(errors)}  # fmt: skip
                print(json.dumps(result), flush=True)
                if max(errors) > 1e-5:  # float32 sums in another order
                    sys.exit(1)
    n = make_mesh("expert=8").shape["expert"]
    chosen = {
        "prefill": choose_exchange(2048, 2, n),
        "decode": choose_exchange(8, 2, n),
        "k4": choose_exchange(2048, 4, n),
    }
    print(json.dumps({"chosen": chosen}), flush=True)

    mesh = make_mesh("expert=8")
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs(0, 256, False)]

    program = jax.jit(functools.partial(expert_parallel, exchange="all_to_all"))
    with jax.set_mesh(mesh):
        unstable = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]  # no serialization promise
        exported = jax.export.export(program, platforms=["tpu"], disabled_checks=unstable)(*shapes)
    calls = exported.mlir_module().count("custom_call @ragged_all_to_all")
    print(json.dumps({"tpu_ragged_all_to_all_calls": calls}))


if __name__ == "__main__":
    assert jax.device_count() == 8
    main()
