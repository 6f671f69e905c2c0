"""`ragged_all_to_all` over a mesh axis, with an emulation for CPU.

Inside `shard_map`, device i sends rows `operand[input_offsets[j] : input_offsets[j] + send_sizes[j]]` to each
device j, which writes them at `output[output_offsets[j] ...]` of its own `output` buffer; `recv_sizes[j]` is how
many rows device i gets from j (the semantics of `jax.lax.ragged_all_to_all`). TPU and GPU run the collective
itself, moving only the rows sent. XLA:CPU has no such collective, so there it is emulated with a dense
`all_to_all` of buffers big enough for the worst case (every row to one device): the same result, with n times the
traffic, which on a host does not matter. `lax.platform_dependent` picks the path when the program is lowered.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    n, rows = send_sizes.shape[0], operand.shape[0]
    r = jnp.arange(rows, dtype=jnp.int32)
    # [n, rows, ...]: chunk j holds the rows for device j, then fill.
    source = input_offsets[:, None] + r[None, :]
    sending = r[None, :] < send_sizes[:, None]
    chunks = jnp.take(operand, jnp.where(sending, source, rows), axis=0, mode="fill", fill_value=0)
    received = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=False)  # [n senders, rows, ...]
    # Where each sender asked its rows to go in this device's output (its output_offsets entry for this device).
    offsets = jax.lax.all_to_all(output_offsets[:, None], axis_name, 0, 0, tiled=False)[:, 0]  # [n senders]
    target = offsets[:, None] + r[None, :]
    target = jnp.where(r[None, :] < recv_sizes[:, None], target, output.shape[0])  # beyond: dropped
    flat = received.reshape(n * rows, *operand.shape[1:])
    return output.at[target.reshape(-1)].set(flat, mode="drop")


def ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    axis_name: str,
) -> jax.Array:
    """`jax.lax.ragged_all_to_all` on TPU and GPU, its dense emulation on CPU (see the module docstring).
    operand `[rows, ...]`, output `[out_rows, ...]`, the offsets and sizes `[axis size]` int32."""
    args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
    real = functools.partial(jax.lax.ragged_all_to_all, axis_name=axis_name)
    return jax.lax.platform_dependent(*args, cpu=functools.partial(_emulated, axis_name=axis_name), default=real)
