"""Run in a fresh interpreter with 8 simulated CPU devices: `python plan_check.py MODEL_DIR MESH`.

Plans the converted model on MESH with `qwen_jax.plan`, then loads it on the same mesh and runs the real generation
prefill, and prints one JSON line: the plan's report and the bytes the most loaded device really holds of the
parameters and of the cache that the prefill returns.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import qwen_jax  # noqa: E402
from qwen_jax import generation, plan  # noqa: E402

BATCH, CONTEXT = 3, 256


def device_bytes(tree) -> int:
    """Bytes of `tree` on its most loaded device."""
    per_device: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def main(directory: str, mesh: str) -> None:
    report = plan.plan(Path(directory), mesh, BATCH, CONTEXT, "float32")
    model = qwen_jax.load(directory, mesh=mesh)
    rng = np.random.default_rng(0)
    length = CONTEXT - 1 - (CONTEXT - 1) % report["prefill_piece"]  # the prompt the plan compiled
    ids = rng.integers(1, 280, size=(BATCH, length))
    settings = generation.resolve_settings(model, max_new_tokens=CONTEXT - length, pad_token_id=0)
    prompt, piece = generation._prepare_prompt(model, ids, None, settings, {}, report["prefill_piece"])
    assert piece == report["prefill_piece"] and prompt.ids.shape == (report["batch"], length), prompt.ids.shape
    with model.activate():
        _, cache = generation._jit_prefill(model.params, prompt, model.config.text, CONTEXT, piece)
    measured = {"params": device_bytes(model.params), "cache": device_bytes(cache)}
    print(json.dumps({"report": report, "measured": measured, "text": plan.format_report(report)}), flush=True)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    main(*sys.argv[1:])
