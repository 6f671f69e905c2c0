"""Run in a fresh interpreter with 8 simulated CPU devices (the device count must be set before jax starts).

    python sharded_equivalence.py MODEL_DIR [MODEL_DIR ...]

For each converted MoE model and each mesh: logits and 8 greedy tokens equal the single-device ones, expert weights
are split over the expert axis, and the bytes each device holds match total / split. Prints one JSON line per
(model, mesh) and exits non-zero on the first failure.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import qwen_jax  # noqa: E402

MESHES = ["data=2,expert=4", "tensor=2,expert=4", "fsdp=8"]


def prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 280, size=(3, 90))  # 3 rows: does not divide data=2, so the batch gets padded
    mask = np.ones_like(ids)
    mask[1, :25] = 0
    return ids, mask


def check(directory: str) -> None:
    ids, mask = prompts()
    single = qwen_jax.load(directory)
    ref_logits = np.asarray(single(ids, mask))
    ref_tokens = qwen_jax.generate(single, ids, mask, max_new_tokens=8, pad_token_id=0)
    total_bytes = sum(x.nbytes for x in jax.tree.leaves(single.params))
    for spec in MESHES:
        model = qwen_jax.load(directory, mesh=spec)
        logits = np.asarray(model(ids, mask))
        valid = mask.astype(bool)
        err = float(np.abs(logits - ref_logits)[valid].max())
        tolerance = 1e-5 * float(np.abs(ref_logits[valid]).max())
        tokens = qwen_jax.generate(model, ids, mask, max_new_tokens=8, pad_token_id=0)
        experts = [x for path, x in jax.tree_util.tree_leaves_with_path(model.params)
                   if any(getattr(k, "key", None) == "experts" for k in path)]  # the routed experts  # fmt: skip
        expert_axis = model.mesh.shape["expert"]
        # Stacked layers: [layers, experts, ...], the expert axis second.
        experts_split = all(x.addressable_shards[0].data.shape[1] == x.shape[1] // expert_axis for x in experts)
        device_bytes = {}
        expected_bytes = 0.0
        for x in jax.tree.leaves(model.params):
            split = math.prod(x.shape) // math.prod(x.addressable_shards[0].data.shape)
            expected_bytes += x.nbytes / split
            for shard in x.addressable_shards:
                device_bytes[shard.device] = device_bytes.get(shard.device, 0) + shard.data.nbytes
        worst = max(abs(b - expected_bytes) / expected_bytes for b in device_bytes.values())
        result = dict(model=os.path.basename(os.path.dirname(directory)), mesh=spec, max_abs_diff=err,
                      tolerance=tolerance, tokens_equal=bool((tokens == ref_tokens).all()),
                      experts_split=experts_split, total_bytes=total_bytes,
                      max_bytes_per_device=max(device_bytes.values()), bytes_deviation=worst)  # fmt: skip
        print(json.dumps(result), flush=True)
        ok = err <= tolerance and result["tokens_equal"] and experts_split and worst <= 0.10
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    for directory in sys.argv[1:]:
        check(directory)
