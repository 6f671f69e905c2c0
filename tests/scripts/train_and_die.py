"""`python train_and_die.py RECIPE.json STEP [key=value ...]`: run the recipe and SIGKILL this process right after
optimizer step STEP is logged (no cleanup, as a crash or a preempted machine would leave it)."""

import os
import signal
import sys

from qwen_jax.train import load_recipe, train


def die_at(step: int):
    def callback(done: int, _metrics: dict) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


if __name__ == "__main__":
    recipe = load_recipe(sys.argv[1], sys.argv[3:])
    train(recipe, callback=die_at(int(sys.argv[2])), progress=False)
    sys.exit("not killed")
