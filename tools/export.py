"""Export a qwen-jax model directory as a Hugging Face checkpoint (safetensors + config + tokenizer files).

    python tools/export.py SRC DST [--layout source|official] [--max-shard-size 5GB]

By default the tensors get the key names, layout, files and dtypes of the checkpoint SRC was converted from, so a
round trip reproduces it; `--layout official` writes the layout of the official releases (also the default for a
model directory with no source record).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    from qwen_jax.errors import OneLineArgumentParser

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="qwen-jax model directory (written by tools/convert.py or a training run)")
    parser.add_argument("dst", help="output Hugging Face checkpoint directory (must not exist)")
    parser.add_argument(
        "--layout",
        choices=["source", "official"],
        default="source",
        help="source: the converted checkpoint's own keys, layout and dtypes (default); official: the layout of the "
        "official releases",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors shard of the official layout, e.g. 5GB, 500MB (default: 5GB)",
    )
    args = parser.parse_args(argv)

    from qwen_jax.checkpoint.export import export, parse_size
    from qwen_jax.errors import InputError

    try:
        size = parse_size(args.max_shard_size)
        export(args.src, args.dst, args.layout, size, lambda msg: print(msg, file=sys.stderr))
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
