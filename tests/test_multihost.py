"""Two local processes with 4 simulated CPU devices each, on a mesh whose data axis crosses them, give the same
logits and tokens as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qwen_jax

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_two_processes_equal_one(built_models, tmp_path):
    built = built_models("qwen3_5_moe_fused")
    out = tmp_path / "result.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2"}  # fmt: skip
    script = REPO / "tests" / "scripts" / "multihost_logits.py"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(built.converted_dir), str(out)],
                         env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)  # fmt: skip
        for i in range(2)
    ]
    logs = [p.communicate(timeout=500)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    result = np.load(out)
    ids, mask = result["ids"], result["mask"]
    single = built.model
    ref = np.asarray(single(ids, mask))
    valid = mask.astype(bool)
    # The same float32 math split differently over devices: 1e-5 of the largest logit, as for one-host meshes.
    assert np.abs(result["logits"] - ref)[valid].max() <= 1e-5 * np.abs(ref[valid]).max()
    expected_tokens = qwen_jax.generate(single, ids, mask, max_new_tokens=6, pad_token_id=0)
    np.testing.assert_array_equal(result["tokens"], expected_tokens)
