"""Peak memory of tools/convert.py on synthetic checkpoints of about 0.5 GB and 3.3 GB (4 and 56 decoder layers of a
hidden-1024 Qwen3.5 model, float32): prints one JSON line per size and the ratio of the peaks.

    python bench/convert_memory.py [WORKDIR]
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    script = REPO / "tests" / "scripts" / "convert_memory.py"
    out = subprocess.run([sys.executable, str(script), str(workdir), "4", "56"], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(REPO)}).stdout  # fmt: skip
    small, large = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    print(json.dumps(small))
    print(json.dumps(large))
    ratios = {
        "checkpoint_ratio": large["checkpoint_bytes"] / small["checkpoint_bytes"],
        "peak_ratio": large["peak_rss_bytes"] / small["peak_rss_bytes"],
        "peak_over_largest_tensor": large["peak_rss_bytes"] / large["largest_tensor_bytes"],
    }
    print(json.dumps(ratios))
