"""The converter's peak memory is bounded by its largest tensor, not by the checkpoint's size (measured on two
synthetic checkpoints that differ only in depth; the multi-GB pair is `bench/convert_memory.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


@pytest.mark.timeout(600)
def test_peak_memory_does_not_grow_with_depth(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    script = REPO / "tests" / "scripts" / "convert_memory.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path), "2", "8"], capture_output=True, text=True,
                            timeout=550, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    small, large = (json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))
    assert large["checkpoint_bytes"] > 1.8 * small["checkpoint_bytes"]
    for run in (small, large):
        assert run["peak_rss_bytes"] <= 4 * run["largest_tensor_bytes"] + 2 * GIB, run
    assert large["peak_rss_bytes"] < 1.10 * small["peak_rss_bytes"], (small, large)
