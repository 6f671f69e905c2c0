"""The gated delta rule, per (batch, value head), with a float32 state `S [key_dim, value_dim]`:

    S_t = exp(g_t) S_{t-1};   S_t += k_t (beta_t (v_t - S_t^T k_t))^T;   o_t = S_t^T q_t

Two forms that compute the same thing:
- `chunked_gated_delta_rule`: the WY/UT chunked form for prefill and training. Within a chunk of C tokens the C
  sequential rank-1 updates collapse into one unit-lower-triangular solve (done here by a matmul-only blocked
  inverse), and a `lax.scan` over chunks carries the state.
- `recurrent_gated_delta_rule` / `gated_delta_step`: one token at a time (the decode step).

All inputs follow the reference's layout: q, k `[batch, seq, key_heads, key_dim]`, v `[batch, seq, value_heads,
value_dim]`, g (log decay, <= 0) and beta `[batch, seq, value_heads]`. Value head j reads key head
`j // (value_heads / key_heads)`. Everything inside runs in float32 at HIGHEST matmul precision; the output is cast
back to v's dtype and the state stays float32. Positions where `mask` is 0 leave the state untouched.

Packed sequences: with `segment_ids [batch, seq]` (1, 2, ... per document) the state restarts from zero at each
change of segment id, so each document sees only itself. In the chunked form that is done by masks, not by a
reset of the decay (a `-inf` log decay would poison the in-chunk cumulative sums): in-chunk pairs of different
segments are cut out of the decay matrix, and the entering state reaches only the positions still in the segment
of the previous chunk's last token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
_BASE_BLOCK = 16


def _mm(spec: str, *xs: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *xs, precision=_HIGHEST)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """`x / sqrt(sum(x^2) + eps)` over the last axis (the reference's and FLA's l2norm)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def prepare_inputs(q, k, v, g, beta, mask, normalize_qk):
    """float32, heads expanded to the value heads, q/k normalized and q scaled; masked positions made inert."""
    repeats = v.shape[2] // k.shape[2]
    q, k = (jnp.repeat(x.astype(jnp.float32), repeats, axis=2) for x in (q, k))
    v, g, beta = (x.astype(jnp.float32) for x in (v, g, beta))
    if normalize_qk:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * (q.shape[-1] ** -0.5)
    if mask is not None:
        keep = mask.astype(bool)[:, :, None]
        g = jnp.where(keep, g, 0.0)
        beta = jnp.where(keep, beta, 0.0)
        k = jnp.where(keep[..., None], k, 0.0)
    return q, k, v, g, beta


def unit_lower_triangular_inverse(a: jax.Array) -> jax.Array:
    """`(I + a)^-1` for a strictly lower-triangular `a [..., n, n]`, by matmuls only.

    Blocks of up to 16 rows are inverted by forward substitution; larger ones recursively by
    `[[X, 0], [Y, Z]]^-1 = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]]`. (jax.scipy's `solve_triangular` inside a scanned
    jit was seen to hang on CPU.)
    """
    n = a.shape[-1]
    if n <= _BASE_BLOCK:
        eye = jnp.eye(n, dtype=a.dtype)

        def substitute(i, inv):
            # Row i of the inverse: e_i - sum_{j<i} a[i, j] inv[j]; rows >= i of inv do not contribute (a[i, j>=i] = 0).
            row = eye[i] - _mm("...j,...jk->...k", jnp.take(a, i, axis=-2), inv)
            return jax.lax.dynamic_update_index_in_dim(inv, row, i, axis=-2)

        return jax.lax.fori_loop(1, n, substitute, jnp.broadcast_to(eye, a.shape))
    h = n // 2
    x, y, z = a[..., :h, :h], a[..., h:, :h], a[..., h:, h:]
    if n % 2 == 0:
        both = unit_lower_triangular_inverse(jnp.stack([x, z]))
        x_inv, z_inv = both[0], both[1]
    else:
        x_inv, z_inv = unit_lower_triangular_inverse(x), unit_lower_triangular_inverse(z)
    off = -_mm("...ij,...jk,...kl->...il", z_inv, y, x_inv)
    top = jnp.concatenate([x_inv, jnp.zeros((*a.shape[:-2], h, n - h), a.dtype)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([off, z_inv], axis=-1)], axis=-2)


ACCELERATOR_CHUNK, CPU_CHUNK = 64, 16


def default_chunk_size() -> int:
    """The chunk length for the default backend: 16 on CPU, where the per-chunk work is small matmuls whose cost
    grows with the chunk (8192 tokens, 8 heads of 64: 68 ms at 16, 114 ms at 64 on a 2-core Xeon), 64 on
    accelerators, whose matrix units want the larger tiles."""
    return CPU_CHUNK if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK


def chunked_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    chunk_size: int | None = None,
    initial_state: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize_qk: bool = True,
    segment_ids: jax.Array | None = None,
    implementation: str | None = None,
    unroll: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Chunked (WY/UT) gated delta rule. Returns (o `[batch, seq, value_heads, value_dim]`, final state
    `[batch, value_heads, key_dim, value_dim]` float32). `mask [batch, seq]`: 0 marks padding; `segment_ids [batch,
    seq]`: packed documents (the XLA form handles them). `unroll`: unroll the scan over chunks (compile analysis).
    `chunk_size`: None for the backend's (`default_chunk_size`). `implementation`:
    "xla" (this function), "pallas" (`qwen_jax.kernels`' TPU kernel, interpreted off TPU) or None: pallas on TPU."""
    chunk_size = chunk_size or default_chunk_size()
    if implementation is None:
        implementation = "pallas" if jax.default_backend() == "tpu" and segment_ids is None else "xla"
    if implementation == "pallas":
        if segment_ids is not None:
            raise ValueError("the pallas delta rule does not take segment_ids; use implementation='xla'")
        from qwen_jax.kernels.delta_rule_tpu import chunked_gated_delta_rule_pallas  # it imports this module

        return chunked_gated_delta_rule_pallas(
            q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state, mask=mask,
            normalize_qk=normalize_qk, interpret=jax.default_backend() != "tpu",
        )  # fmt: skip
    if implementation != "xla":
        raise ValueError(f"implementation must be 'xla', 'pallas' or None, not {implementation!r}")
    out_dtype = v.dtype
    batch, seq, heads, value_dim = v.shape
    key_dim = k.shape[-1]
    q, k, v, g, beta = prepare_inputs(q, k, v, g, beta, mask, normalize_qk)

    # Pad to whole chunks: zero g, beta and k make the padded tail inert.
    c = chunk_size
    pad = (-seq) % c
    n = (seq + pad) // c
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    g, beta = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (g, beta))

    # -> [chunks, batch, heads, c, dim] (chunks leading for the scan).
    def chunked(x):
        x = x.reshape(batch, n, c, heads, *x.shape[3:])
        return jnp.moveaxis(x, (1, 3), (0, 2))

    q, k, v, g, beta = map(chunked, (q, k, v, g, beta))
    segments = () if segment_ids is None else _segment_masks(segment_ids, n, c)
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))
    strict = jnp.tril(jnp.ones((c, c), dtype=bool), -1)

    # One chunk per step, all its work inside the step: on CPU, per-chunk products of a few heads run several times
    # faster than the same products batched over every chunk (which stream the whole sequence's intermediates
    # through memory), and a fused step keeps them in cache.
    def step(state, xs):
        q, k, v, g, beta, *segment = xs  # [batch, heads, c, ...]
        cum = jnp.cumsum(g, axis=-1)  # log of the decay from the chunk start to each position
        diff = cum[..., :, None] - cum[..., None, :]
        # Mask before the exp: above the diagonal diff is positive and could overflow.
        decay = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
        entering = jnp.exp(cum)  # what is left of the entering state at each position
        leaving = jnp.exp(cum[..., -1:] - cum)  # what is left of each position's update at the chunk end
        if segment:
            same, carries = segment
            decay, entering, leaving = decay * same, entering * carries, leaving * same[..., -1, :]
        k_beta = k * beta[..., None]
        scores = _mm("...id,...jd->...ij", jnp.concatenate([k_beta, q], axis=-2), k)  # [..., 2c, c]
        a = jnp.where(strict, scores[..., :c, :] * decay, 0.0)
        attn = scores[..., c:, :] * decay
        # The UT transform: pseudo-values u and keys w that read the entering state.
        t = unit_lower_triangular_inverse(a)
        uw = _mm("...ij,...jd->...id", t, jnp.concatenate([v * beta[..., None], k_beta * entering[..., None]], -1))
        u, w = uw[..., :value_dim], uw[..., value_dim:]
        read = _mm("...ik,...kv->...iv", jnp.concatenate([w, q * entering[..., None]], axis=-2), state)
        v_new = u - read[..., :c, :]  # the deltas
        o = read[..., c:, :] + _mm("...ij,...jv->...iv", attn, v_new)
        state = state * entering[..., -1, None, None] + _mm("...ik,...iv->...kv", k * leaving[..., None], v_new)
        return state, o

    state = (
        jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    state, o = jax.lax.scan(step, state, (q, k, v, g, beta, *segments), unroll=n if unroll else 1)
    o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(batch, n * c, heads, value_dim)[:, :seq]
    return o.astype(out_dtype), state


def _through_padding(segment_ids: jax.Array) -> jax.Array:
    """Segment ids `[batch, seq]` with each padding position (id 0, inert) given the id before it, so that padding
    neither restarts the state nor ends a segment: the final state is the one after the last real token."""
    index = jnp.where(segment_ids > 0, jnp.arange(segment_ids.shape[1]), -1)
    last_real = jax.lax.cummax(index, axis=1)
    return jnp.where(last_real >= 0, jnp.take_along_axis(segment_ids, jnp.maximum(last_real, 0), axis=1), 0)


def _segment_masks(segment_ids: jax.Array, chunks: int, c: int) -> tuple[jax.Array, jax.Array]:
    """For segment ids `[batch, seq]`: `same [chunks, batch, 1, c, c]` (positions i, j of a chunk are in one
    segment) and `carries [chunks, batch, 1, c]` (position i is in the segment of the previous chunk's last position;
    the first chunk continues the initial state). The chunk padding joins the last segment (it is inert)."""
    seg = jnp.pad(_through_padding(segment_ids), ((0, 0), (0, chunks * c - segment_ids.shape[1])), mode="edge")
    seg = jnp.moveaxis(seg.reshape(seg.shape[0], chunks, 1, c), 1, 0)  # [n, b, 1, c]
    previous_last = jnp.concatenate([seg[:1, ..., :1], seg[:-1, ..., -1:]], axis=0)
    return seg[..., :, None] == seg[..., None, :], seg == previous_last


def gated_delta_step(
    q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, state: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token, closed form, on prepared float32 inputs: q, k `[batch, heads, key_dim]`, v `[batch, heads,
    value_dim]`, g, beta `[batch, heads]`, state `[batch, heads, key_dim, value_dim]`."""
    state = state * jnp.exp(g)[..., None, None]
    delta = (v - _mm("bhk,bhkv->bhv", k, state)) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return _mm("bhk,bhkv->bhv", q, state), state


def recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize_qk: bool = True,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token gated delta rule (same arguments and results as `chunked_gated_delta_rule`)."""
    out_dtype = v.dtype
    batch, seq, heads, value_dim = v.shape
    if segment_ids is None:
        continues = jnp.ones((batch, seq), bool)
    else:  # the state restarts where the segment id changes
        seg = _through_padding(segment_ids)
        continues = jnp.concatenate([jnp.ones((batch, 1), bool), seg[:, 1:] == seg[:, :-1]], axis=1)
    q, k, v, g, beta = prepare_inputs(q, k, v, g, beta, mask, normalize_qk)
    state = (
        jnp.zeros((batch, heads, k.shape[-1], value_dim), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )

    def step(state, xs):
        *inputs, keep = xs
        o, state = gated_delta_step(*inputs, jnp.where(keep[:, None, None, None], state, 0.0))
        return state, o

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, continues))
    state, o = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), state
