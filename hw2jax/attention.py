"""Parts 2 and 3: weightless self-attention, softmax attention and linear attention.

Layouts follow ``jax.nn.dot_product_attention``: q, k, v are ``[batch, T, heads, head_dim]``.
The value head_dim may differ from the query/key one.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FEATURE_MAPS",
    "NonPositiveDenominatorWarning",
    "blockwise_softmax_attention",
    "key_bias_attention",
    "linear_attention",
    "self_attention",
    "self_attention_weights",
    "softmax_attention",
]

FeatureMap = Literal["elu", "relu", "identity"]

FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # elu(x) + 1 > 0 keeps every weight positive (Katharopoulos et al. 2020).
    "elu": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    # The assignment's version: softmax with the exponentials simply dropped.
    "identity": lambda x: x,
}


class NonPositiveDenominatorWarning(RuntimeWarning):
    """Linear attention's normaliser phi(q_i) . sum_j phi(k_j) was <= 0 for some query."""


# ----------------------------------------------------------------------------- checks


def _floating(x: jax.typing.ArrayLike, name: str, min_ndim: int) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < min_ndim:
        raise ValueError(f"{name} needs at least {min_ndim} dims, got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating array, got dtype {x.dtype}; cast it with "
            f"{name}.astype(jnp.float32)."
        )
    return x


def _check_qkv(q, k, v, causal: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v = (_floating(a, n, 0) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    layout = "[batch, T, heads, head_dim]"
    for a, n in ((q, "q"), (k, "k"), (v, "v")):
        if a.ndim != 4:
            raise ValueError(f"{n} must be {layout}, got shape {a.shape}.")
    if k.shape != q.shape[:1] + k.shape[1:2] + q.shape[2:]:
        raise ValueError(
            f"k {k.shape} must match q {q.shape} in batch, heads and head_dim ({layout})."
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {v.shape} must match k {k.shape} in batch, T and heads.")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"causal attention needs as many queries as keys, got T_q={q.shape[1]} and "
            f"T_k={k.shape[1]}."
        )
    return q, k, v


def _raise_if_overflowed(logits: jax.Array, what: str) -> None:
    """Eagerly (outside jit) turns an overflow into an error instead of NaN outputs."""
    if isinstance(logits, jax.core.Tracer):
        return
    if not bool(jnp.all(jnp.isfinite(logits))):
        raise FloatingPointError(
            f"{what} overflowed {logits.dtype} (|x|^2 is above {jnp.finfo(logits.dtype).max:.2e})."
            " Rescale the inputs, or enable float64 with "
            "jax.config.update('jax_enable_x64', True) and pass float64 arrays."
        )


# ------------------------------------------------------------------ weightless attention


def self_attention_weights(x: jax.typing.ArrayLike, *, scale: float | None = None) -> jax.Array:
    """softmax(scale * x x^T) over the last axis, for x of shape [..., T, D]."""
    x = _floating(x, "x", 2)
    logits = jnp.einsum("...td,...sd->...ts", x, x)
    if scale is not None:
        logits = logits * scale
    _raise_if_overflowed(logits, "self-attention logits x_i . x_j")
    # softmax subtracts each row's max, so logits near 1e18 (beta = 1e9) stay finite.
    return jax.nn.softmax(logits, axis=-1)


def self_attention(x: jax.typing.ArrayLike, *, scale: float | None = None) -> jax.Array:
    """Attention with no weights, q = k = v = x, for x of shape [..., T, D].

    ``scale=None`` applies no 1/sqrt(D) scaling, as in the assignment.
    """
    x = _floating(x, "x", 2)
    return self_attention_weights(x, scale=scale) @ x


# ---------------------------------------------------------------------- softmax attention


def softmax_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    *,
    causal: bool = False,
    implementation: Literal["auto", "naive", "blockwise"] = "auto",
) -> jax.Array:
    """Scaled dot-product attention, softmax(q k^T / sqrt(d)) v.

    ``"naive"`` builds the T x T matrix (O(T^2) memory); ``"blockwise"`` is
    :func:`blockwise_softmax_attention` (O(T) memory, same result); ``"auto"`` picks
    blockwise once the score matrix would pass 2^26 entries per head and batch (T = 8192).
    """
    q, k, v = _check_qkv(q, k, v, causal)
    if implementation not in ("auto", "naive", "blockwise"):
        raise ValueError(
            f"unknown implementation {implementation!r}; use auto, naive or blockwise."
        )
    if implementation == "blockwise" or (
        implementation == "auto" and q.shape[1] * k.shape[1] >= 2**26
    ):
        return blockwise_softmax_attention(q, k, v, causal=causal)
    q = q * (1.0 / math.sqrt(q.shape[-1]))
    # Heads moved next to the batch before the matmuls: XLA's CPU dot is much faster with the
    # batch dims leading than on the einsum "bqhd,bkhd->bhqk" (1.8x at T=256, measured).
    qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    logits = matmul_f32(qh, kh, transpose_b=True)
    if causal:
        t = q.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = matmul_f32(weights, vh).astype(v.dtype)
    return jnp.swapaxes(out, 1, 2)


def blockwise_softmax_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    *,
    causal: bool = False,
    block_size: int = 512,
) -> jax.Array:
    """Exact softmax attention with an online softmax over key blocks (the flash-attention
    algorithm in plain JAX): O(T) memory in the forward and the backward pass, which
    recomputes the scores block by block instead of storing them."""
    q, k, v = _check_qkv(q, k, v, causal)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    t_q, t_k = q.shape[1], k.shape[1]
    bq, bk = min(block_size, t_q), min(block_size, t_k)
    # Work in [B, H, T, D] (heads next to the batch) so every block product is a plain
    # batched matmul: on CPU that is much faster than einsums over [B, T, H, D].
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    pad = lambda a, n: jnp.pad(a, ((0, 0), (0, 0), (0, n), (0, 0)))  # noqa: E731
    q, k, v = pad(q, -t_q % bq), pad(k, -t_k % bk), pad(v, -t_k % bk)
    out = _flash(q, k, v, (causal, bq, bk, t_k))
    return jnp.swapaxes(out[:, :, :t_q], 1, 2)


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """[B, H, T, ...] -> [T/size, B, H, size, ...], block index first for scanning."""
    b, h, t, *rest = x.shape
    return jnp.moveaxis(x.reshape(b, h, t // size, size, *rest), 2, 0)


def _unblock(x: jax.Array) -> jax.Array:
    n, b, h, size, *rest = x.shape
    return jnp.moveaxis(x, 0, 2).reshape(b, h, n * size, *rest)


def _batched_dot(a: jax.Array, b: jax.Array, *, transpose_a: bool = False,
                 transpose_b: bool = False, preferred_element_type=None) -> jax.Array:
    """Batched a @ b (a^T, b^T when asked) as one dot_general over the leading dims. Keep the
    batch (and head) dims leading: XLA's CPU dot is much faster on that layout than on an
    einsum that contracts across it, and a transposed operand named in the dot_general is not
    first copied into a transposed layout (as jnp.matmul of a swapaxes would be)."""
    batch = tuple(range(a.ndim - 2))
    contract = ((a.ndim - 2 if transpose_a else a.ndim - 1,),
                (b.ndim - 1 if transpose_b else b.ndim - 2,))  # fmt: skip
    return jax.lax.dot_general(a, b, (contract, (batch, batch)),
                               preferred_element_type=preferred_element_type)  # fmt: skip


def matmul_f32(a: jax.Array, b: jax.Array, transpose_b: bool = False,
               transpose_a: bool = False) -> jax.Array:  # fmt: skip
    """:func:`_batched_dot` accumulated and returned in float32."""
    return _batched_dot(a, b, transpose_a=transpose_a, transpose_b=transpose_b,
                        preferred_element_type=jnp.float32)  # fmt: skip


def key_bias_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_bias: jax.Array | None,
                       dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """softmax(q.k^T + key_bias) v as XLA computes it (BERT's attention): [B, T, heads, D] in
    and out, q already scaled, key_bias [B, T] added to each key's scores (None: no mask);
    ``dropout`` is applied to the probabilities. Heads next to the batch (see matmul_f32):
    ~1.8x faster on CPU than einsums over [B, T, heads, D]; scaling q, inside the copy that
    moves the heads, spares a pass over the T x T scores."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    scores = matmul_f32(q, k, transpose_b=True)
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :]
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.swapaxes(matmul_f32(probs.astype(v.dtype), v), 1, 2)


def _block_scores(qi, kj, i, j, static):
    """Scaled scores [B, H, bq, bk] of query block i and key block j, masked with -inf."""
    causal, bq, bk, t_k = static
    s = matmul_f32(qi, kj, transpose_b=True)
    if not causal and t_k % bk == 0:
        return s  # nothing to mask: skip a pass over the block
    k_pos = j * bk + jnp.arange(bk)
    valid = (k_pos < t_k)[None, :]
    if causal:
        valid = valid & (k_pos[None, :] <= (i * bq + jnp.arange(bq))[:, None])
    return jnp.where(valid, s, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, static):
    return _flash_fwd(q, k, v, static)[0]


def _key_range(i, static, n_k: int):
    """Key blocks [0, hi) that query block i can see: all of them, or with ``causal`` only
    those that start at or before its last query (the rest are fully masked: skipped)."""
    causal, bq, bk, _ = static
    return n_k if not causal else jnp.minimum(((i + 1) * bq - 1) // bk + 1, n_k)


def _query_range_start(j, static):
    """The first query block that can see key block j (0 unless ``causal``)."""
    causal, bq, bk, _ = static
    return 0 if not causal else (j * bk) // bq


def _flash_fwd(q, k, v, static):
    """q, k, v in [B, H, T, D], T padded to whole blocks."""
    causal, bq, bk, _ = static
    scale = 1.0 / math.sqrt(q.shape[-1])
    kb, vb = _blocks(k, bk), _blocks(v, bk)

    def query_block(args):
        qi, i = args
        qi = qi * scale

        def key_block(carry, kj, vj, j):
            m, denom, acc = carry
            s = _block_scores(qi, kj, i, j, static)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + p.sum(-1)
            acc = acc * corr[..., None] + matmul_f32(p.astype(vj.dtype), vj)
            return m_new, denom, acc

        b, h = qi.shape[:2]
        init = (jnp.full((b, h, bq), -jnp.inf), jnp.zeros((b, h, bq)),
                jnp.zeros((b, h, bq, v.shape[-1])))  # fmt: skip
        if causal:  # a loop of dynamic length: the key blocks after the diagonal are skipped
            hi = _key_range(i, static, kb.shape[0])
            step = lambda j, c: key_block(c, kb[j], vb[j], j)  # noqa: E731
            m, denom, acc = jax.lax.fori_loop(0, hi, step, init)
        else:  # a scan over the blocks measured ~8% faster here than the same fori_loop
            step = lambda c, xs: (key_block(c, *xs), None)  # noqa: E731
            (m, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, jnp.arange(kb.shape[0])))
        return (acc / denom[..., None]).astype(v.dtype), m + jnp.log(denom)

    qb = _blocks(q, bq)
    out, lse = jax.lax.map(query_block, (qb, jnp.arange(qb.shape[0])))
    return _unblock(out), (q, k, v, _unblock(out), lse)


def _flash_bwd(static, res, d_out):
    _, bq, bk, _ = static
    q, k, v, out, lse = res  # lse: [nq, B, H, bq]
    scale = 1.0 / math.sqrt(q.shape[-1])
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, H, T]
    qb, dob, deltab = _blocks(q * scale, bq), _blocks(d_out, bq), _blocks(delta, bq)
    nq = qb.shape[0]

    def key_block(dq, xs):
        kj, vj, j = xs

        def query_block(i, carry):
            dq, dk, dv = carry
            qi, doi, lse_i, delta_i = qb[i], dob[i], lse[i], deltab[i]
            s = _block_scores(qi, kj, i, j, static)
            p = jnp.exp(s - lse_i[..., None])  # the forward's probabilities, recomputed
            dv = dv + matmul_f32(p, doi.astype(jnp.float32), transpose_a=True)
            ds = p * (matmul_f32(doi, vj, transpose_b=True) - delta_i[..., None])
            dk = dk + matmul_f32(ds, qi.astype(jnp.float32), transpose_a=True)
            return dq.at[i].add(matmul_f32(ds, kj.astype(jnp.float32))), dk, dv

        zeros = (jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
        lo = _query_range_start(j, static)
        dq, dk, dv = jax.lax.fori_loop(lo, nq, query_block, (dq, *zeros))
        return dq, (dk, dv)

    kb, vb = _blocks(k, bk), _blocks(v, bk)
    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32),
                                (kb, vb, jnp.arange(kb.shape[0])))  # fmt: skip
    return ((_unblock(dq) * scale).astype(q.dtype), _unblock(dk).astype(k.dtype),
            _unblock(dv).astype(v.dtype))  # fmt: skip


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------- linear attention


def linear_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    *,
    causal: bool = False,
    feature_map: FeatureMap = "elu",
    eps: float = 1e-6,
    method: Literal["chunked", "recurrent"] = "chunked",
    chunk_size: int = 64,
) -> jax.Array:
    """out_i = phi(q_i) . S_i / (phi(q_i) . z_i + eps), with S = sum_j phi(k_j) v_j^T and
    z = sum_j phi(k_j); the sums run over j <= i when ``causal``.

    O(T) time and memory. Non-causal attention computes S once. Causal attention uses
    ``method="chunked"`` (exact attention inside chunks of ``chunk_size`` plus a running
    state between chunks) or ``method="recurrent"`` (a ``lax.scan`` over time: linear
    attention as an RNN). Neither builds a T x T matrix nor a T x d x d stack of states.

    With ``feature_map="identity"`` the "weights" phi(q_i).phi(k_j) can be negative, so the
    denominator can reach zero or go negative: outputs then blow up or flip sign. That case
    emits a :class:`NonPositiveDenominatorWarning` (also under jit) instead of passing
    silently; use "elu" (always > 0) for a proper weighted average.
    """
    q, k, v = _check_qkv(q, k, v, causal)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(
            f"unknown feature_map {feature_map!r}; choose one of {sorted(FEATURE_MAPS)}."
        )
    if method not in ("chunked", "recurrent"):
        raise ValueError(f"unknown method {method!r}; choose 'chunked' or 'recurrent'.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    phi = FEATURE_MAPS[feature_map]
    fq, fk = phi(q), phi(k)
    # A column of ones appended to v makes the last output column the denominator,
    # so numerator and normaliser come from one product.
    v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
    if not causal:
        # Heads next to the batch, and both products dot_generals with those dims leading:
        # XLA's CPU dot then needs no transposed copies of T-long operands (forward 2.1x,
        # gradient 1.5x at T=16384). The causal chunked product gained nothing from this.
        fq, fk, v1 = (jnp.swapaxes(a, 1, 2) for a in (fq, fk, v1))  # [B, H, T, .]
        state = _batched_dot(fk, v1, transpose_a=True)  # [B, H, D, D + 1]
        out = jnp.swapaxes(_batched_dot(fq, state), 1, 2)
    elif method == "chunked":
        out = _causal_product_chunked(fq, fk, v1, chunk_size)
    else:
        out = _causal_product_recurrent(fq, fk, v1)
    num, den = out[..., :-1], out[..., -1:]
    if feature_map == "identity":
        _warn_if_nonpositive(den)
    return num / (den + eps)


def _warn_if_nonpositive(den: jax.Array) -> None:
    def check(min_den):
        min_den = float(np.min(min_den))
        if min_den <= 0.0:
            warnings.warn(
                NonPositiveDenominatorWarning(
                    f"linear attention denominator phi(q).sum(phi(k)) reached {min_den:.3g} <= 0 "
                    "with feature_map='identity': the weights are not a distribution and the "
                    "outputs may be huge, sign-flipped, inf or NaN. Use feature_map='elu'."
                ),
                stacklevel=2,
            )

    jax.debug.callback(check, jnp.min(den))


def _causal_product_chunked(fq: jax.Array, fk: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
    """sum_{j<=i} (fq_i . fk_j) v_j, chunk by chunk."""
    b, t, h, d = fq.shape
    e = v.shape[-1]
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        # Padding goes after the last real step, so no real query ever sees it.
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        fq, fk, v = (jnp.pad(a, widths) for a in (fq, fk, v))
    fq = fq.reshape(b, n, chunk, h, d)
    fk = fk.reshape(b, n, chunk, h, d)
    v = v.reshape(b, n, chunk, h, e)

    # Running state before each chunk: an exclusive prefix sum over chunk states.
    chunk_states = jnp.einsum("bnchd,bnche->bnhde", fk, v)
    before = jnp.cumsum(chunk_states, axis=1) - chunk_states
    inter = jnp.einsum("bnqhd,bnhde->bnqhe", fq, before)

    scores = jnp.einsum("bnqhd,bnkhd->bnhqk", fq, fk)
    scores = jnp.where(jnp.tril(jnp.ones((chunk, chunk), bool)), scores, 0.0)
    intra = jnp.einsum("bnhqk,bnkhe->bnqhe", scores, v)
    return (inter + intra).reshape(b, n * chunk, h, e)[:, :t]


def _scan_time(step, carry, *xs: jax.Array):
    """Scans ``step`` over the time axis (axis 1) of [batch, T, ...] arrays."""
    carry, ys = jax.lax.scan(step, carry, tuple(jnp.moveaxis(x, 1, 0) for x in xs))
    return carry, jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1), ys)


@jax.custom_vjp
def _causal_product_recurrent(fq: jax.Array, fk: jax.Array, v: jax.Array) -> jax.Array:
    """sum_{j<=i} (fq_i . fk_j) v_j as an RNN whose state is S_i = sum_{j<=i} fk_j v_j^T."""
    return _causal_product_recurrent_fwd(fq, fk, v)[0]


def _prefix_states_apply(fq, fk, v, contract: str) -> jax.Array:
    """Runs S_i = S_{i-1} + fk_i v_i^T forward and contracts each S_i with fq_i."""
    b, _, h, d = fk.shape
    s0 = jnp.zeros((b, h, d, v.shape[-1]), jnp.result_type(fk, v))

    def step(s, inp):
        q_t, k_t, v_t = inp
        s = s + k_t[..., :, None] * v_t[..., None, :]
        return s, jnp.einsum(contract, q_t, s)

    return _scan_time(step, s0, fq, fk, v)[1]


def _causal_product_recurrent_fwd(fq, fk, v):
    # Only the inputs are kept: the backward pass re-runs the recurrence instead of
    # storing T states of d x e (which autodiff of the scan would do).
    return _prefix_states_apply(fq, fk, v, "bhd,bhde->bhe"), (fq, fk, v)


def _causal_product_recurrent_bwd(res, g):
    fq, fk, v = res
    # d fq_i = S_i g_i, with the same forward prefix states.
    d_fq = _prefix_states_apply(g, fk, v, "bhe,bhde->bhd")
    # d fk_j = R_j v_j and d v_j = R_j^T fk_j, with R_j = sum_{i>=j} fq_i g_i^T (suffix sums).
    b, _, h, d = fq.shape
    r0 = jnp.zeros((b, h, d, g.shape[-1]), jnp.result_type(fq, g))

    def step(r, inp):
        q_t, g_t, k_t, v_t = inp
        r = r + q_t[..., :, None] * g_t[..., None, :]
        return r, (jnp.einsum("bhde,bhe->bhd", r, v_t), jnp.einsum("bhde,bhd->bhe", r, k_t))

    def rev(a):
        return jnp.flip(a, axis=1)

    _, (d_fk, d_v) = _scan_time(step, r0, rev(fq), rev(g), rev(fk), rev(v))
    return d_fq, rev(d_fk), rev(d_v)


_causal_product_recurrent.defvjp(_causal_product_recurrent_fwd, _causal_product_recurrent_bwd)
