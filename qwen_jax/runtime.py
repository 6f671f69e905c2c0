"""Process-level setup that every entry point does first: JAX's persistent compilation cache (so a second run of
the same shapes skips XLA compilation) and, on multi-host jobs, `jax.distributed.initialize`.

A job is multi-host when its launcher says so: `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES` and
`JAX_PROCESS_ID`), SLURM / Open MPI task counts, or several TPU worker host names.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwen_jax.errors import InputError

# Environment variables that say this process is one of several (set by the launchers that use them).
_MULTI_PROCESS_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_PROCESS_COUNT_HINTS = ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_NUM_SLICES")


# Programs that compile faster than this are not written to the persistent cache (JAX's own default) unless
# JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise.
MIN_CACHED_COMPILE_SECONDS = 1.0


def compilation_cache_dir() -> Path:
    """QWEN_JAX_COMPILATION_CACHE, else JAX's own JAX_COMPILATION_CACHE_DIR, else ~/.cache/qwen_jax/xla."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen_jax" / "xla"
    return Path(os.environ.get("QWEN_JAX_COMPILATION_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default)


def env_number(name: str, default: float | None, kind: type = int) -> float | None:
    """The environment variable `name` as a `kind` (int or float), `default` when unset or empty; a value that is
    not such a number is an `InputError` naming the variable."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise InputError(
            f"environment variable {name}={value!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None


def is_multi_process() -> bool:
    if any(os.environ.get(name) for name in _MULTI_PROCESS_HINTS):
        return True
    if any(env_number(name, 1) > 1 for name in _PROCESS_COUNT_HINTS):
        return True
    # TPU pod slices list every worker's host name.
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def setup(cache: bool = True) -> None:
    """Enable the persistent compilation cache and join a multi-host job when this process is part of one."""
    # Read before jax is imported: jax's own import rejects a malformed value with a traceback.
    minimum = env_number("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", MIN_CACHED_COMPILE_SECONDS, float)
    import jax

    if cache:
        directory = compilation_cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)
    if is_multi_process() and not jax.distributed.is_initialized():
        # CPU processes exchange collectives over gloo (accelerators use their own interconnect).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Explicit coordinates when the launcher gives them; otherwise JAX detects the cluster (TPU, SLURM, MPI).
        address = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS")
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=env_number("JAX_NUM_PROCESSES", None),
            process_id=env_number("JAX_PROCESS_ID", None),
        )
