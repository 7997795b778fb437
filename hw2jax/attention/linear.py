"""Part 3: linear attention in O(T), non-causal and causal (chunked or recurrent)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.attention.helpers import batched_dot, check_qkv, pad_axis, sum_after, sum_before
from hw2jax.attention.linear_pallas import causal_linear_product_pallas
from hw2jax.errors import InputError

FeatureMap = Literal["elu", "relu", "identity", "taylor"]
IMPLEMENTATIONS = dispatch.LINEAR


def taylor_features(x: jax.Array) -> jax.Array:
    """Based's feature map (Arora et al. 2024), the exponential's second-order Taylor series:
    phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) d^(1/2))], so that phi(q) . phi(k) =
    1 + s + s^2 / 2 with s = q . k / sqrt(d), which is > 0 for every s. 1 + d + d^2 features."""
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    return jnp.concatenate(
        [jnp.ones_like(x[..., :1]), x / d**0.25, outer / (2**0.5 * d**0.5)], axis=-1
    )


FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # elu(x) + 1 > 0 keeps every weight positive (Katharopoulos et al. 2020).
    "elu": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    # The assignment's version: softmax with the exponentials simply dropped.
    "identity": lambda x: x,
    "taylor": taylor_features,
}


class NonPositiveDenominatorWarning(RuntimeWarning):
    """Linear attention's normaliser phi(q_i) . sum_j phi(k_j) was <= 0, or so nearly cancelled
    that it is below ``CANCELLATION`` of |phi(q_i)| sum_j |phi(k_j)|, for some query."""


# A denominator below this share of |phi(q_i)| sum_j |phi(k_j)| means weights of both signs
# cancelling: outputs then grow up to ~1/share-fold beyond the values' range.
CANCELLATION = 1e-3


def linear_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    *,
    causal: bool = False,
    feature_map: FeatureMap = "elu",
    eps: float = 1e-6,
    implementation: Literal[
        "auto", "chunked", "recurrent", "pallas", "fused_cpu", "parallel"
    ] = "auto",
    chunk_size: int = 64,
) -> jax.Array:
    """out_i = phi(q_i) . S_i / (phi(q_i) . z_i + eps), with S = sum_j phi(k_j) v_j^T and
    z = sum_j phi(k_j); the sums run over j <= i when ``causal``.

    O(T) time and memory. Non-causal attention computes S once. Causal attention uses
    ``implementation="chunked"`` (exact attention inside chunks of ``chunk_size`` plus a
    running state between chunks), ``"recurrent"`` (a ``lax.scan`` over time: linear
    attention as an RNN), ``"pallas"`` (the chunk algorithm as one Pallas kernel,
    forward and backward: Triton on a GPU, interpret mode elsewhere, where it is slow and
    meant for checks) or ``"fused_cpu"`` (the chunk algorithm, chunks of 64, as our
    fused CPU kernels, forward and backward: float32, features and values of one size, a
    multiple of 16 up to 128). Non-causal, ``"fused_cpu"`` is one fused CPU kernel for
    the whole attention, features included (elu or relu; same sizes). ``"parallel"`` forms the
    T x T weights phi(q_i) . phi(k_j) (masked when causal): O(T^2), but for ``"taylor"`` taken
    straight from the scores as 1 + s + s^2 / 2, without the 1 + d + d^2 features. ``"auto"``
    asks :mod:`hw2jax.attention.dispatch` (parallel for the Taylor map while T_k is below its
    feature count; else fused_cpu where it can run and pays, else chunked). Apart from
    parallel, none builds a T x T matrix nor a T x d x d stack of states.

    With ``feature_map="identity"`` the "weights" phi(q_i).phi(k_j) can be negative, so the
    denominator can cancel to nearly zero or go negative: outputs then blow up or flip sign.
    When it is <= 0, or below ``CANCELLATION`` of |phi(q_i)| sum_j |phi(k_j)|, a
    :class:`NonPositiveDenominatorWarning` is emitted (also under jit) instead of passing
    silently; use "elu" (always > 0) for a proper weighted average.
    """
    q, k, v = check_qkv(q, k, v, causal)
    if feature_map not in FEATURE_MAPS:
        raise InputError(
            f"unknown feature_map {feature_map!r}; choose one of {sorted(FEATURE_MAPS)}."
        )
    dispatch.check(implementation, IMPLEMENTATIONS, "linear_attention")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}.")
    if implementation == "auto" and feature_map == "taylor":
        if dispatch.taylor_parallel(k.shape[1], q.shape[-1]):
            implementation = "parallel"
    if implementation == "parallel":
        num, den = _parallel_products(q, k, v, feature_map, causal)
    else:
        if not causal and implementation in ("auto", "fused_cpu"):
            reason = functools.partial(kernels.dense_linear_unavailable_reason, q, v, feature_map)
            paths = dispatch.Measure(
                (q, k, v),
                lambda path: functools.partial(
                    linear_attention, feature_map=feature_map, eps=eps, implementation=path
                ),
            )
            if _fused(implementation, reason, paths, causal) == "fused_cpu":
                return kernels.linear_attention_cpu(q, k, v, feature_map=feature_map, eps=eps)
        phi = FEATURE_MAPS[feature_map]
        num, den = linear_products(
            phi(q), phi(k), v, causal=causal, implementation=implementation, chunk_size=chunk_size
        )
    if feature_map == "identity":  # phi(x) = x: the features are q and k themselves
        # |q_i| sum_j |k_j| bounds sum_j |q_i . k_j|, the denominator's size had no weight
        # been negative; O(T) to compute, unlike that sum itself.
        k_norms = jnp.linalg.norm(k, axis=-1, keepdims=True)
        k_norms = jnp.cumsum(k_norms, axis=1) if causal else jnp.sum(k_norms, 1, keepdims=True)
        scale = jnp.linalg.norm(q, axis=-1, keepdims=True) * k_norms
        _warn_if_cancelled(den, den / jnp.maximum(scale, jnp.finfo(den.dtype).tiny))
    return normalise(num, den + eps)


def _parallel_products(q, k, v, feature_map: str, causal: bool):
    """linear_products' (num, den) from the T_q x T_k weights phi(q_i) . phi(k_j)."""
    if feature_map == "taylor":
        s = jnp.einsum("bihd,bjhd->bhij", q, k) / q.shape[-1] ** 0.5
        weights = 1.0 + s + 0.5 * s * s
    else:
        phi = FEATURE_MAPS[feature_map]
        weights = jnp.einsum("bihd,bjhd->bhij", phi(q), phi(k))
    if causal:
        weights = jnp.where(jnp.tri(q.shape[1], k.shape[1], dtype=bool), weights, 0.0)
    return jnp.einsum("bhij,bjhe->bihe", weights, v), _den_out(jnp.sum(weights, axis=-1))


def linear_products(
    fq: jax.Array,
    fk: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    implementation: str,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """(sum_j (fq_i . fk_j) v_j, sum_j fq_i . fk_j) over all j, or j <= i when ``causal``, for
    features already computed ([batch, T, heads, features]): the O(T) core that every
    feature-map attention (linear, cosFormer, Performer) shares."""
    if not causal:
        return _products(fq, fk, v)
    if implementation in ("auto", "fused_cpu"):
        reason = functools.partial(kernels.causal_linear_unavailable_reason, fq, v)
        paths = dispatch.Measure(
            (fq, fk, v),
            lambda path: functools.partial(
                linear_products, causal=True, implementation=path, chunk_size=chunk_size
            ),
        )
        implementation = _fused(implementation, reason, paths, causal)
        if implementation == "fused_cpu":
            return kernels.causal_linear_product_cpu(fq, fk, v)
    if implementation == "pallas":
        return causal_linear_product_pallas(fq, fk, v, chunk_size)
    if implementation == "chunked":
        t = fq.shape[1]
        chunk = min(chunk_size, t)
        padded = -(-t // chunk) * chunk
        # Padding goes after the last real step, so no real query ever sees it.
        num, den = _causal_products_chunked(*(pad_axis(a, 1, padded) for a in (fq, fk, v)), chunk)
        return num[:, :t], den[:, :t]
    # With a column of ones appended to v, the last output column is the denominator.
    out = _causal_product_recurrent(fq, fk, _with_ones(v))
    return out[..., :-1], out[..., -1:]


def _fused(
    implementation: str, reason: dispatch.Reason, measure: dispatch.Measure, causal: bool
) -> str:
    """ "fused_cpu" or "chunked" for auto (the dispatch rule), or fused_cpu checked."""
    return dispatch.resolve_fused(
        implementation,
        IMPLEMENTATIONS,
        "linear_attention",
        reason,
        lambda: dispatch.linear(reason, measure=measure, causal=causal),
        instead="'auto'",
    )


@jax.custom_vjp
def normalise(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den with den [..., 1] broadcast over num's last axis, and a backward pass that
    XLA:CPU runs fast."""
    return num / den


def _normalise_fwd(num, den):
    inv = 1.0 / den
    out = num * inv
    return out, (out, inv)


def _normalise_bwd(residuals, g):
    out, inv = residuals
    # The row sums as a contraction, not a jnp.sum of the product: XLA:CPU sends that sum to
    # YNNPACK, many times slower (benchmarks/NOTES.md, "Gradients against torch on CPU").
    return g * inv, -jnp.einsum("...e,...e->...", g, out)[..., None] * inv


normalise.defvjp(_normalise_fwd, _normalise_bwd)


# The non-causal and chunked products carry their own backward passes: autodiff of the same
# forward made XLA:CPU copy and transpose more (benchmarks/NOTES.md, "Gradients against torch
# on CPU"). Both work with heads next to the batch, [B, H, T, .]: XLA's CPU dot then needs no
# transposed copies of T-long operands.


def _heads_first(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, 1, 2)


def _den_out(den: jax.Array) -> jax.Array:
    """[B, H, T] -> [B, T, H, 1], the layout the products return."""
    return jnp.swapaxes(den, 1, 2)[..., None]


def _den_in(g: jax.Array) -> jax.Array:
    return jnp.swapaxes(g[..., 0], 1, 2)


@jax.custom_vjp
def _products(fq, fk, v):
    return _products_fwd(fq, fk, v)[0]


def _with_ones(a: jax.Array) -> jax.Array:
    """A column of ones appended: in a product with it, the last column is the plain sum."""
    return jnp.concatenate([a, jnp.ones((*a.shape[:-1], 1), a.dtype)], axis=-1)


def _products_fwd(fq, fk, v):
    fq, fk, v1 = (_heads_first(a) for a in (fq, fk, _with_ones(v)))
    state = batched_dot(fk, v1, transpose_a=True)  # [B, H, D, E + 1]: sum fk v^T and sum fk
    out = _heads_first(batched_dot(fq, state))
    return (out[..., :-1], out[..., -1:]), (fq, fk, v1, state)


def _products_bwd(residuals, grads):
    fq, fk, v1, state = residuals
    g = _heads_first(jnp.concatenate(grads, axis=-1))  # [B, H, T, E + 1]
    d_state = batched_dot(fq, g, transpose_a=True)
    d_fq = batched_dot(g, state, transpose_b=True)
    d_fk = batched_dot(v1, d_state, transpose_b=True)
    d_v = batched_dot(fk, d_state[..., :-1])
    return tuple(_heads_first(a) for a in (d_fq, d_fk, d_v))


_products.defvjp(_products_fwd, _products_bwd)


def _in_chunks(a: jax.Array, chunk: int) -> jax.Array:
    """[B, T, H, D] -> [B, H, T / chunk, chunk, D]."""
    b, t, h, d = a.shape
    return _heads_first(a).reshape(b, h, t // chunk, chunk, d)


def _from_chunks(a: jax.Array) -> jax.Array:
    b, h, n, c, d = a.shape
    return _heads_first(a.reshape(b, h, n * c, d))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_products_chunked(fq, fk, v, chunk):
    """sum_{j<=i} (fq_i . fk_j) v_j and sum_{j<=i} fq_i . fk_j, chunk by chunk: exact inside
    each chunk, plus the state of the chunks before (T a whole number of chunks)."""
    return _causal_products_chunked_fwd(fq, fk, v, chunk)[0]


def _causal_products_chunked_fwd(fq, fk, v, chunk):
    fq, fk, v = (_in_chunks(a, chunk) for a in (fq, fk, v))
    before = sum_before(batched_dot(fk, v, transpose_a=True))  # [B, H, n, D, E]
    z_before = sum_before(jnp.sum(fk, axis=3))  # [B, H, n, D]
    mask = jnp.tril(jnp.ones((chunk, chunk), bool))
    scores = jnp.where(mask, batched_dot(fq, fk, transpose_b=True), 0.0)
    num = batched_dot(fq, before) + batched_dot(scores, v)
    den = jnp.einsum("bhncd,bhnd->bhnc", fq, z_before) + jnp.sum(scores, -1)
    b, h, n, c = den.shape
    out = (_from_chunks(num), _den_out(den.reshape(b, h, n * c)))
    return out, (fq, fk, v, before, z_before, scores)


def _causal_products_chunked_bwd(chunk, residuals, grads):
    fq, fk, v, before, z_before, scores = residuals
    g_num = _in_chunks(grads[0], chunk)
    g_den = _den_in(grads[1]).reshape(scores.shape[:-1])  # [B, H, n, C]
    mask = jnp.tril(jnp.ones((chunk, chunk), bool))
    # The weights' own gradient: d (num_i, den_i) / d (fq_i . fk_j) = g_i . v_j + g_den_i.
    d_scores = jnp.where(mask, batched_dot(g_num, v, transpose_b=True) + g_den[..., None], 0.0)
    d_fq = (
        batched_dot(d_scores, fk)
        + batched_dot(g_num, before, transpose_b=True)
        + g_den[..., None] * z_before[..., None, :]
    )
    d_state = sum_after(batched_dot(fq, g_num, transpose_a=True))  # [B, H, n, D, E]
    d_z = sum_after(jnp.einsum("bhncd,bhnc->bhnd", fq, g_den))
    d_fk = (
        batched_dot(d_scores, fq, transpose_a=True)
        + batched_dot(v, d_state, transpose_b=True)
        + d_z[..., None, :]
    )
    d_v = batched_dot(scores, g_num, transpose_a=True) + batched_dot(fk, d_state)
    return tuple(_from_chunks(a) for a in (d_fq, d_fk, d_v))


_causal_products_chunked.defvjp(_causal_products_chunked_fwd, _causal_products_chunked_bwd)


def _warn_if_cancelled(den: jax.Array, share: jax.Array) -> None:
    def check(min_den, min_share):
        min_den, min_share = float(np.min(min_den)), float(np.min(min_share))
        if min_den <= 0.0:
            problem = f"reached {min_den:.3g} <= 0"
        elif min_share < CANCELLATION:
            problem = (
                f"fell to {min_den:.3g}, {min_share:.2g} of |phi(q)| sum |phi(k)| (positive and "
                f"negative weights cancel, amplifying outputs up to ~{1 / min_share:.2g}x)"
            )
        else:
            return
        warnings.warn(
            NonPositiveDenominatorWarning(
                f"linear attention denominator phi(q).sum(phi(k)) {problem} with "
                "feature_map='identity': the weights are not a distribution and the outputs may "
                "be huge, sign-flipped, inf or NaN. Use feature_map='elu'."
            ),
            stacklevel=2,
        )

    jax.debug.callback(check, jnp.min(den), jnp.min(share))


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
