"""One process of a two-process job (4 simulated CPU devices each); the launcher sets JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, as for any multi-host run.

    python multihost_logits.py MODEL_DIR OUT.npy

Loads the model on a (data=2, expert=4) mesh whose data axis crosses the two processes, runs one forward and one
greedy generation, and (process 0) saves the gathered logits and tokens.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import qwen_jax  # noqa: E402
from qwen_jax import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.setup(cache=False)
    assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
    model = qwen_jax.load(sys.argv[1], mesh="data=2,expert=4")
    ids = np.random.default_rng(0).integers(1, 280, size=(2, 70))
    mask = np.ones_like(ids)
    mask[1, :11] = 0
    logits = multihost_utils.process_allgather(model(ids, mask), tiled=True)
    tokens = qwen_jax.generate(model, ids, mask, max_new_tokens=6, pad_token_id=0)
    if jax.process_index() == 0:
        np.savez(sys.argv[2], logits=np.asarray(logits), tokens=tokens, ids=ids, mask=mask)
