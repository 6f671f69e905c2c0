"""The chunked gated delta rule as a Pallas TPU kernel: the computation of
`qwen_jax.layers.delta_rule.chunked_gated_delta_rule` (same arguments, same results), which selects it on TPU.

Grid (batch, value_heads, chunks). Each grid step holds one chunk of one head in VMEM; the head's float32 state
`[key_dim, value_dim]` lives in a VMEM scratch buffer that persists across grid steps. The chunk axis is "arbitrary"
(sequential, so the state carry is valid), batch and heads are "parallel" (split over a megacore's two cores). This
is preferred over a grid (batch, value_heads) with the chunk loop inside the body because there each step's blocks
would be the whole sequence: VMEM would grow with the sequence (a 32k-token prefill needs 16 MiB per float32 input
at dim 128, beyond the scoped VMEM of every TPU generation), and the DMA of chunk i+1 would no longer overlap the
compute of chunk i, which Pallas' pipelining over grid steps gives for free.

Blocks (the last two dims of a TPU block must be multiples of (8, 128) or the array's own):
- q, k, v and o stay in the reference layout, viewed as `[batch, seq, heads * dim]` (a free reshape): one head's
  chunk is the block `[chunk, dim]` at column block `head`, so nothing is transposed or copied when the head dims are
  multiples of 128 (all Qwen3.5 / Qwen3-Next sizes; smaller dims are zero-padded to 128). Value head h reads key
  head `h // (value_heads / key_heads)` through the index map: no repeat in memory. The chunk is rounded up to a
  multiple of 16 (bfloat16 packs 16 rows per tile); the last chunk may overhang the sequence (Pallas pads the read,
  drops the write), and its overhanging rows are cut out by the mask, so no padded copy is made either.
- The log decays, betas and the mask travel as rows: `[batch, heads, chunks, chunk]`, blocks of 8 chunks `[8,
  chunk]` (fetched once per 8 grid steps). A column layout `[seq, 1]` would be legal too, but a TPU tile pads its
  lane dim to 128, so it would take 128 times its size in HBM and in DMA traffic, more than q, k and v together.

Inside, everything is float32 at HIGHEST matmul precision, as in the XLA form, with Mosaic-friendly formulations:
iota masks instead of constant matrices, row-to-column and column-to-row moves as exact masked reductions and
matmuls (one nonzero term per sum) instead of transposes, no dynamic indexing, and the unit-lower-triangular
inverse by recursive 2x2 block merging on the full matrix (log2(chunk) levels of two matmuls). Padded positions
(mask 0, the overhang) get zero k, g and beta (and a zero v, as the overhang's values are unspecified), so they
never change the state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwen_jax.layers.delta_rule import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST
_ROW_MULTIPLE = 16  # chunk rows: a bfloat16 tile is [16, 128]
_LANES = 128  # head dims are padded to a multiple of this
_CHUNKS_PER_BLOCK = 8  # chunks per block of the row-layout gates (the minimum second-to-last block dim)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    """2D matmul contracting dim `contract[0]` of a with dim `contract[1]` of b: (1, 0) is a @ b, (1, 1) a @ b.T,
    (0, 0) a.T @ b."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _iota(shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Row and column indices of a matrix of `shape`."""
    return jax.lax.broadcasted_iota(jnp.int32, shape, 0), jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _masked_row_sums(row: jax.Array, keep: jax.Array) -> jax.Array:
    """`[1, n]` -> `[n, 1]`: `out[i] = sum of row[j] over the j where keep[i, j]`, `keep [n, n]` boolean. With the
    identity it moves a row to a column (exact: one term per sum); with the causal mask it is the cumulative sum."""
    return jnp.sum(jnp.where(keep, jnp.broadcast_to(row, keep.shape), 0.0), axis=1, keepdims=True)


def _as_rows(column: jax.Array) -> jax.Array:
    """`[n, 1]` -> `[n, n]` with `out[i, j] = column[j]`: `ones @ diag(column)`, exact (one nonzero term per sum)."""
    n = column.shape[0]
    rows, cols = _iota((n, n))
    diagonal = jnp.where(rows == cols, jnp.broadcast_to(column, (n, n)), 0.0)
    return _dot(jnp.ones((n, n), jnp.float32), diagonal)


def _masked(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x `[n, d]` with the rows where the column `keep [n, 1]` is 0 set to zero (a select: NaNs do not leak)."""
    return jnp.where(jnp.broadcast_to(keep, x.shape) != 0, x, 0.0)


def unit_lower_triangular_inverse_2d(a: jax.Array) -> jax.Array:
    """`(I + a)^-1` for a strictly lower-triangular `a [n, n]`, with full-matrix matmuls and iota masks only.

    After level l, `inv` is block-diagonal with the inverses of the diagonal blocks of size 2^l. Merging two
    neighbours, `[[X, 0], [Y, Z]]^-1 = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]]`, is `inv - inv @ Y' @ inv` for all blocks
    at once, where Y' keeps the entries of a in the same 2^(l+1) block but different 2^l blocks (the Y's).
    """
    n = a.shape[0]
    rows, cols = _iota((n, n))
    inv = jnp.where(rows == cols, 1.0, 0.0).astype(jnp.float32)
    level = 0
    while (1 << level) < n:
        same_pair = (rows >> (level + 1)) == (cols >> (level + 1))
        off_diagonal = jnp.where(same_pair & ((rows >> level) != (cols >> level)), a, 0.0)
        inv = inv - _dot(_dot(inv, off_diagonal), inv)
        level += 1
    return inv


def _kernel(
    q_ref, k_ref, v_ref, g_ref, beta_ref, keep_ref, state_in_ref, o_ref, state_out_ref, state, *, normalize_qk, scale
):
    """One chunk of one (batch, value head). Blocks: q, k `[c, key_dim]`, v, o `[c, value_dim]`; g, beta, keep
    `[8, c]` (rows of 8 chunks, this one at row `chunk % 8`); state_in, state_out and the scratch `state` `[key_dim,
    value_dim]` (float32). q is scaled by `scale` after the optional l2 normalization of q and k."""
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _():
        state[...] = state_in_ref[...]

    c = q_ref.shape[0]
    rows, cols = _iota((c, c))
    causal, strict = rows >= cols, rows > cols
    block_rows, _ = _iota(g_ref.shape)
    this_chunk = block_rows == jax.lax.rem(chunk, _CHUNKS_PER_BLOCK)

    def row(ref):  # [1, c]: this chunk's row of a gate block (a masked sum, not a dynamic slice)
        return jnp.sum(jnp.where(this_chunk, ref[...], 0.0), axis=0, keepdims=True)

    g = row(g_ref)
    beta, keep = (_masked_row_sums(row(ref), rows == cols) for ref in (beta_ref, keep_ref))  # [c, 1] columns
    q, k, v = (ref[...].astype(jnp.float32) for ref in (q_ref, k_ref, v_ref))
    if normalize_qk:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * scale
    k, v = _masked(k, keep), _masked(v, keep)

    cum = _masked_row_sums(g, causal)  # [c, 1]: log decay since the chunk start
    cum_rows = _as_rows(cum)  # [c, c]: cum[j] at (i, j)
    total = jnp.sum(jnp.where(cols == c - 1, cum_rows, 0.0), axis=1, keepdims=True)  # [c, 1]: cum[c-1] everywhere
    # Mask before the exp: above the diagonal the difference is positive and could overflow.
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, cum - cum_rows, 0.0)), 0.0)

    k_beta = k * beta
    t = unit_lower_triangular_inverse_2d(jnp.where(strict, _dot(k_beta, k, (1, 1)) * decay, 0.0))
    u = _dot(t, v * beta)  # pseudo-values
    w = _dot(t, k_beta * jnp.exp(cum))  # keys reading the entering state
    attn = _dot(q, k, (1, 1)) * decay

    s = state[...]
    v_new = u - _dot(w, s)
    o_ref[...] = (_dot(q * jnp.exp(cum), s) + _dot(attn, v_new)).astype(o_ref.dtype)
    chunk_decay = jnp.exp(jnp.max(total, axis=0, keepdims=True))  # [1, 1]
    state[...] = s * chunk_decay + _dot(k * jnp.exp(total - cum), v_new, (0, 0))

    @pl.when(chunk == pl.num_programs(2) - 1)
    def _():
        state_out_ref[...] = state[...]


def chunked_gated_delta_rule_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    chunk_size: int = 64,
    initial_state: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize_qk: bool = True,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule on TPU. q, k `[batch, seq, key_heads, key_dim]`, v `[batch, seq, value_heads,
    value_dim]`, g, beta `[batch, seq, value_heads]`, initial_state `[batch, value_heads, key_dim, value_dim]`, mask
    `[batch, seq]` (0 marks padding). Returns (o `[batch, seq, value_heads, value_dim]` in v's dtype, final state
    `[batch, value_heads, key_dim, value_dim]` float32). `interpret` (True or `pltpu.InterpretParams`) runs the
    kernel in Pallas' interpreter, on any backend."""
    batch, seq, value_heads, value_dim = v.shape
    key_heads, key_dim = k.shape[2:]
    if q.shape != k.shape or k.shape[:2] != (batch, seq) or value_heads % key_heads:
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} do not form a delta rule with grouped heads")
    group = value_heads // key_heads
    c = min(_round_up(chunk_size, _ROW_MULTIPLE), _round_up(seq, _ROW_MULTIPLE))
    length = max(seq, c)  # only a sequence shorter than one chunk is padded (to fill the block)
    chunks = pl.cdiv(length, c)
    dk, dv = _round_up(key_dim, _LANES), _round_up(value_dim, _LANES)

    def flat(x, dim):  # [batch, seq, heads, d] -> [batch, length, heads * dim], zero-padded (a no-op at full size)
        x = jnp.pad(x, ((0, 0), (0, length - seq), (0, 0), (0, dim - x.shape[-1])))
        return x.reshape(batch, length, -1)

    def gate_rows(x):  # [batch, seq, (heads)] -> [batch, heads or 1, chunks rounded to 8, c] float32, zero-padded
        x = x.astype(jnp.float32).reshape(batch, seq, -1)
        x = jnp.pad(x, ((0, 0), (0, _round_up(chunks, _CHUNKS_PER_BLOCK) * c - seq), (0, 0)))
        return jnp.moveaxis(x, 2, 1).reshape(batch, x.shape[2], -1, c)

    keep = jnp.ones((batch, seq), bool) if mask is None else mask.astype(bool)
    g, beta = (jnp.where(keep[..., None], x, 0.0) for x in (g, beta))
    state = (
        jnp.zeros((batch, value_heads, key_dim, value_dim), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    state = jnp.pad(state, ((0, 0), (0, 0), (0, dk - key_dim), (0, dv - value_dim)))

    # Index maps use lax.div, not //: jnp's floor division of signed ints lowers through sign, which Mosaic lowers
    # per TPU chip.
    def chunk_block(dim, head=lambda h: h):
        return pl.BlockSpec((None, c, dim), lambda b, h, t: (b, t, head(h)))

    def gate_block(head=lambda h: h):
        index = lambda b, h, t: (b, head(h), jax.lax.div(t, _CHUNKS_PER_BLOCK), 0)
        return pl.BlockSpec((None, None, _CHUNKS_PER_BLOCK, c), index)

    key_block = chunk_block(dk, lambda h: jax.lax.div(h, group))
    state_block = pl.BlockSpec((None, None, dk, dv), lambda b, h, t: (b, h, 0, 0))
    o, final_state = pl.pallas_call(
        functools.partial(_kernel, normalize_qk=normalize_qk, scale=key_dim**-0.5),
        grid=(batch, value_heads, chunks),
        # The mask is one row for all heads.
        in_specs=[
            key_block,
            key_block,
            chunk_block(dv),
            gate_block(),
            gate_block(),
            gate_block(lambda h: 0),
            state_block,
        ],
        out_specs=[chunk_block(dv), state_block],
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, value_heads * dv), v.dtype),
            jax.ShapeDtypeStruct(state.shape, jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="chunked_gated_delta_rule",
    )(flat(q, dk), flat(k, dk), flat(v, dv), gate_rows(g), gate_rows(beta), gate_rows(keep), state)
    o = o.reshape(batch, length, value_heads, dv)[:, :seq, :, :value_dim]
    return o, final_state[..., :key_dim, :value_dim]
