"""Convert a Hugging Face Qwen3.5 / Qwen3-Next checkpoint to a qwen-jax model directory.

    python tools/convert.py SRC DST [--dtype bfloat16|float32]

By default every tensor keeps its source dtype; `A_log`, `dt_bias` and norm weights are always float32.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    from qwen_jax.errors import OneLineArgumentParser

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("dst", help="output model directory (must not exist)")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="cast weights to this dtype (default: keep each tensor's source dtype)",
    )
    parser.add_argument("--expert-layout", choices=["v5", "legacy"], default=None,
                        help="layout of fused expert tensors when their shapes cannot tell it (hidden == 2 * "
                        "moe_intermediate): v5 = [E, 2I, H] as transformers >= 5 writes, legacy = [E, H, 2I] as the "
                        "official Qwen3-VL-MoE files (default: decide by shape, then by transformers_version)")
    args = parser.parse_args(argv)

    from qwen_jax.checkpoint.convert import convert
    from qwen_jax.errors import InputError

    try:
        convert(args.src, args.dst, args.dtype, lambda msg: print(msg, file=sys.stderr), args.expert_layout)
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
