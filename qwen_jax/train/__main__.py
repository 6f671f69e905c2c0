"""Train or fine-tune: `python -m qwen_jax.train --config RECIPE.json [key=value ...] [--smoke]`.

The recipe (`qwen_jax.train.recipe`) names the model config or the model directory to start from, the tokenizer,
the data and the optimizer settings; `key=value` overrides replace its top-level keys (values as JSON, else
strings). A run whose `run_dir` holds checkpoints resumes from the latest one. `--smoke` applies the recipe's
`smoke` overrides (a few steps of a small run, for CI).
"""

from __future__ import annotations

import sys

from qwen_jax.errors import InputError, OneLineArgumentParser


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="python -m qwen_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the training recipe (JSON), e.g. configs/demo-train.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="replace top-level recipe keys")
    p.add_argument("--smoke", action="store_true", help="apply the recipe's smoke overrides (a few steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to the log)")
    args = p.parse_args(argv)
    from qwen_jax.train.recipe import load_recipe

    try:
        from qwen_jax import runtime

        runtime.setup()  # first: it checks the environment's settings before jax reads them
        recipe = load_recipe(args.config, args.overrides, smoke=args.smoke)
        from qwen_jax.train.trainer import train

        train(recipe, progress=not args.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
