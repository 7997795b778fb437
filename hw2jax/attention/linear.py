"""Part 3: linear attention in O(T), non-causal and causal (chunked or recurrent)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax.attention.helpers import batched_dot, check_qkv
from hw2jax.attention.linear_pallas import causal_linear_product_pallas

FeatureMap = Literal["elu", "relu", "identity"]

FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # elu(x) + 1 > 0 keeps every weight positive (Katharopoulos et al. 2020).
    "elu": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    # The assignment's version: softmax with the exponentials simply dropped.
    "identity": lambda x: x,
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
    method: Literal["chunked", "recurrent", "pallas"] = "chunked",
    chunk_size: int = 64,
) -> jax.Array:
    """out_i = phi(q_i) . S_i / (phi(q_i) . z_i + eps), with S = sum_j phi(k_j) v_j^T and
    z = sum_j phi(k_j); the sums run over j <= i when ``causal``.

    O(T) time and memory. Non-causal attention computes S once. Causal attention uses
    ``method="chunked"`` (exact attention inside chunks of ``chunk_size`` plus a running
    state between chunks), ``method="recurrent"`` (a ``lax.scan`` over time: linear
    attention as an RNN) or ``method="pallas"`` (the chunk algorithm as one Pallas kernel,
    forward and backward: Triton on a GPU, interpret mode elsewhere, where it is slow and
    meant for checks). None builds a T x T matrix nor a T x d x d stack of states.

    With ``feature_map="identity"`` the "weights" phi(q_i).phi(k_j) can be negative, so the
    denominator can cancel to nearly zero or go negative: outputs then blow up or flip sign.
    When it is <= 0, or below ``CANCELLATION`` of |phi(q_i)| sum_j |phi(k_j)|, a
    :class:`NonPositiveDenominatorWarning` is emitted (also under jit) instead of passing
    silently; use "elu" (always > 0) for a proper weighted average.
    """
    q, k, v = check_qkv(q, k, v, causal)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(
            f"unknown feature_map {feature_map!r}; choose one of {sorted(FEATURE_MAPS)}."
        )
    if method not in ("chunked", "recurrent", "pallas"):
        raise ValueError(f"unknown method {method!r}; choose 'chunked', 'recurrent' or 'pallas'.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    phi = FEATURE_MAPS[feature_map]
    fq, fk = phi(q), phi(k)
    num, den = linear_products(fq, fk, v, causal=causal, method=method, chunk_size=chunk_size)
    if feature_map == "identity":
        # |phi(q_i)| sum_j |phi(k_j)| bounds sum_j |phi(q_i).phi(k_j)|, the denominator's size
        # had no weight been negative; O(T) to compute, unlike that sum itself.
        k_norms = jnp.linalg.norm(fk, axis=-1, keepdims=True)
        k_norms = jnp.cumsum(k_norms, axis=1) if causal else jnp.sum(k_norms, 1, keepdims=True)
        scale = jnp.linalg.norm(fq, axis=-1, keepdims=True) * k_norms
        _warn_if_cancelled(den, den / jnp.maximum(scale, jnp.finfo(den.dtype).tiny))
    return num / (den + eps)


def linear_products(
    fq: jax.Array, fk: jax.Array, v: jax.Array, *, causal: bool, method: str, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """(sum_j (fq_i . fk_j) v_j, sum_j fq_i . fk_j) over all j, or j <= i when ``causal``, for
    features already computed ([batch, T, heads, features]): the O(T) core that every
    feature-map attention (linear, cosFormer, Performer) shares."""
    # A column of ones appended to v makes the last output column the denominator,
    # so numerator and normaliser come from one product.
    v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
    if not causal:
        # Heads next to the batch, and both products dot_generals with those dims leading:
        # XLA's CPU dot then needs no transposed copies of T-long operands (benchmarks/NOTES.md).
        # The causal chunked product gained nothing from this.
        fqh, fkh, v1h = (jnp.swapaxes(a, 1, 2) for a in (fq, fk, v1))  # [B, H, T, .]
        state = batched_dot(fkh, v1h, transpose_a=True)  # [B, H, D, D + 1]
        out = jnp.swapaxes(batched_dot(fqh, state), 1, 2)
    elif method == "pallas":
        return causal_linear_product_pallas(fq, fk, v, chunk_size)
    elif method == "chunked":
        out = _causal_product_chunked(fq, fk, v1, chunk_size)
    else:
        out = _causal_product_recurrent(fq, fk, v1)
    return out[..., :-1], out[..., -1:]


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
