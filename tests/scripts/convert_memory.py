"""Peak memory of tools/convert.py on synthetic checkpoints.

    python convert_memory.py WORKDIR LAYERS [LAYERS ...]

For each layer count: writes a Qwen3.5-dense checkpoint of random float32 weights (hidden 1024, vocab 32000), converts
it with tools/convert.py in a child process, and prints one JSON line with the checkpoint's size, its largest
tensor and the converter's peak resident memory (the child's VmHWM; Linux only).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[2]


def synthetic_checkpoint(directory: Path, layers: int) -> tuple[int, int]:
    config = transformers.Qwen3_5TextConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, linear_num_key_heads=8, linear_num_value_heads=16,
        linear_key_head_dim=64, linear_value_head_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [6, 5, 5]},
    )  # fmt: skip
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.Qwen3_5ForCausalLM(config).state_dict().items()}
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    save_file(tensors, directory / "model.safetensors")
    sizes = [t.nbytes for t in tensors.values()]
    return sum(sizes), max(sizes)


def main(workdir: Path, layer_counts: list[int]) -> None:
    for layers in layer_counts:
        src, dst = workdir / f"src{layers}", workdir / f"dst{layers}"
        total, largest = synthetic_checkpoint(src, layers)
        # The child converts, then reports its own peak resident memory: VmHWM, which starts afresh at exec (unlike
        # ru_maxrss, which a child inherits from the parent's size at fork).
        code = (
            "import runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0]\n"
            "print('PEAK', int(hwm.split()[1]) * 1024)"
        )
        result = subprocess.run([sys.executable, "-c", code, str(REPO / "tools" / "convert.py"), str(src), str(dst)],
                                capture_output=True, text=True)  # fmt: skip
        peaks = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PEAK")]
        if result.returncode or not peaks:
            sys.exit(result.stderr)
        print(json.dumps(dict(layers=layers, checkpoint_bytes=total, largest_tensor_bytes=largest,
                              peak_rss_bytes=peaks[0])), flush=True)  # fmt: skip
        shutil.rmtree(src)
        shutil.rmtree(dst)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(n) for n in sys.argv[2:]])
