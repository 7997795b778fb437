"""BERT's attention: softmax scores with a per-key bias (the padding mask) and attention
dropout, by XLA or by the fused CPU kernels (the row kernel forward, the flash kernels forward
and backward)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.attention.helpers import check_qkv, matmul_f32
from hw2jax.errors import InputError
from hw2jax.kernels import dropout

IMPLEMENTATIONS = dispatch.KEY_BIAS


def key_bias_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_bias: jax.Array | None = None,
    *,
    qkv_biases: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    scale: float = 1.0,
    dropout_rate: float = 0.0,
    dropout_seeds: jax.Array | None = None,
    implementation: str = "auto",
    what: str = "key_bias_attention",
    out_dtype=jnp.float32,
) -> jax.Array:
    """softmax(scale q.k^T + key_bias) v: [B, T, heads, D] in, [B, T, heads, D] out, float32
    or, with ``out_dtype=jnp.bfloat16``, rounded to bf16 (by the AMX kernel as it stores its
    output, elsewhere cast); key_bias [B, T] added to each key's scores (None: no mask).

    ``dropout_rate`` > 0 drops probabilities by :mod:`hw2jax.kernels.dropout`'s hash of
    ``dropout_seeds`` (uint32 [B, heads], :func:`hw2jax.kernels.dropout.seeds`): every path
    drops the same entries for the same seeds.

    ``implementation``: ``"xla"`` (heads next to the batch: faster on CPU than einsums over
    [B, T, heads, D]), ``"fused_cpu"`` (the row kernel, :func:`hw2jax.kernels.cpu_attention`,
    float32, or for bf16 on AMX tiles :func:`hw2jax.kernels.amx_attention`, when nothing is
    differentiated and nothing dropped; else the flash kernels,
    :func:`hw2jax.kernels.cpu_flash_attention`, forward and backward, on q, k, v in float32)
    or ``"auto"`` (:func:`hw2jax.attention.dispatch.key_bias`). ``what`` names the caller in
    error messages.

    ``qkv_biases`` ([heads, D] each, or None): the projections' biases, added to q, k and v as a
    dense layer adds them; the float32 row kernel adds them as it reads q, k and v, every other
    path first.
    """
    q, k, v = check_qkv(q, k, v, causal=False)
    out = jnp.dtype(out_dtype)
    if out not in (jnp.float32, jnp.bfloat16):
        raise InputError(f"{what}'s attention returns float32 or bfloat16, not {out.name}.")
    batch, t, heads = q.shape[:3]
    if key_bias is not None and jnp.shape(key_bias) != (k.shape[0], k.shape[1]):
        raise InputError(
            f"key_bias must be [batch, T_k] = {k.shape[:2]}, one value per key, got shape "
            f"{jnp.shape(key_bias)}."
        )
    dropout.check(dropout_rate, dropout_seeds, (batch, heads), (t, k.shape[1]))
    rate = float(dropout_rate)
    paths = timed_paths(q.shape, q.dtype, scale, rate)
    chosen = resolve(implementation, q.shape[-1], what, paths, dropout=rate > 0.0)
    forward, gradient = chosen if isinstance(chosen, tuple) else (chosen, chosen)
    key_bias = jnp.zeros((batch, t), jnp.float32) if key_bias is None else key_bias
    if dropout_seeds is None:
        dropout_seeds = jnp.zeros((batch, heads), jnp.uint32)
    args = (q, k, v, key_bias.astype(jnp.float32), dropout_seeds)
    if qkv_biases is not None:
        _check_biases(qkv_biases, q)
        float32 = {q.dtype, *(jnp.asarray(b).dtype for b in qkv_biases)} == {jnp.dtype("float32")}
        if forward == "fused_cpu" and rate == 0.0 and float32:
            return kernels.differentiated_by(
                _returning(out, functools.partial(_row_with_biases, scale=float(scale))),
                _returning(
                    out,
                    functools.partial(_biases_first, _xla if gradient == "xla" else _flash, scale),
                ),
            )(*args, tuple(qkv_biases))
        args = (*_added(q, k, v, qkv_biases), *args[3:])
    form = {"xla": _xla, "fused_cpu": functools.partial(_fused, out=out)}[forward]
    if forward == gradient == "xla":  # one form both ways: no custom VJP between
        return form(*args, scale, rate).astype(out)
    differentiated = _xla if gradient == "xla" else _flash
    return kernels.differentiated_by(
        _returning(out, functools.partial(form, scale=float(scale), rate=rate)),
        _returning(out, functools.partial(differentiated, scale=float(scale), rate=rate)),
    )(*args)


def _returning(out: jnp.dtype, form):
    """``form`` with its output as ``out`` (cast where it returns another dtype)."""
    return lambda *args: form(*args).astype(out)


def resolve(
    implementation: str,
    head_dim: int,
    what: str = "key_bias_attention",
    measure: dispatch.Measure | None = None,
    dropout: bool = False,
) -> str | tuple[str, str]:
    """ "xla", "fused_cpu", or for "auto" the dispatch rule's choice (timed where ``measure`` is
    given): one name, or the forward path and the gradient's (``what`` names the caller in the
    message)."""
    reason = functools.partial(fused_unavailable, head_dim)
    return dispatch.resolve_fused(
        implementation,
        IMPLEMENTATIONS,
        what,
        reason,
        lambda: dispatch.key_bias(reason, measure=measure, dropout=dropout),
    )


def timed_paths(shape: tuple, dtype, scale: float, rate: float = 0.0) -> dispatch.Measure:
    """The paths auto times for q, k and v of ``shape`` and ``dtype`` ([B, T, heads, D]) with
    dropout at ``rate``: the fused kernels (as :func:`key_bias_attention` says) or XLA's form,
    on them as they are."""
    qkv = jax.ShapeDtypeStruct(shape, dtype)
    bias = jax.ShapeDtypeStruct(shape[:2], jnp.float32)

    def run(path: str):
        def attend(q, k, v, key_bias):
            batch, _, heads = q.shape[:3]  # the probe may cut batch and heads
            seeds = jnp.arange(batch * heads, dtype=jnp.uint32).reshape(batch, heads)
            return key_bias_attention(
                q,
                k,
                v,
                key_bias,
                scale=scale,
                dropout_rate=rate,
                dropout_seeds=seeds if rate else None,
                implementation=path,
            )

        return attend

    return dispatch.Measure((qkv, qkv, qkv, bias), run)


def fused_unavailable(head_dim: int) -> str | None:
    """Why the fused kernels cannot run BERT's attention here (None: they can)."""
    return kernels.cpu_attention_unavailable_reason(head_dim, jnp.float32)


def _check_biases(biases, q: jax.Array) -> None:
    if len(biases) != 3 or any(jnp.shape(b) != q.shape[-2:] for b in biases):
        raise InputError(
            f"qkv_biases are q's, k's and v's biases, [heads, D] = {q.shape[-2:]} each; got "
            f"{[jnp.shape(b) for b in biases]}."
        )


def _added(q, k, v, biases) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k and v with their biases, in the dtype a dense layer's sum takes."""
    return tuple(t + b for t, b in zip((q, k, v), biases, strict=True))


def _row_with_biases(q, k, v, key_bias, seeds, biases, scale: float):
    """The float32 row kernel, adding the biases as it reads q, k and v."""
    del seeds
    return kernels.cpu_attention(q, k, v, key_bias, scale=scale, qkv_biases=biases)


def _biases_first(form, scale: float, q, k, v, key_bias, seeds, biases):
    """``form`` (without dropout) on q, k and v with their biases added."""
    return form(*_added(q, k, v, biases), key_bias, seeds, scale, 0.0)


def _xla(q, k, v, key_bias, seeds, scale: float, rate: float):
    """XLA's form, heads next to the batch; float32 out."""
    q = q * scale if scale != 1.0 else q
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    scores = matmul_f32(q, k, transpose_b=True) + key_bias[:, None, None, :]
    probs = jax.nn.softmax(scores, axis=-1)
    if rate > 0.0:
        probs = dropout.apply(probs, seeds, rate)
    return jnp.swapaxes(matmul_f32(probs.astype(v.dtype), v), 1, 2)


def _flash(q, k, v, key_bias, seeds, scale: float, rate: float):
    """The flash kernels on q, k, v in float32 (upcast where bf16)."""
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    return kernels.cpu_flash_attention(
        q, k, v, key_bias, scale=scale, dropout_rate=rate, dropout_seeds=seeds
    )


def _fused(q, k, v, key_bias, seeds, scale: float, rate: float, out=jnp.float32):
    """The fused path when nothing is differentiated: with dropout the flash kernel; else the
    row kernel, for bf16 on AMX tiles where the dispatch rule says so (returning ``out``, as it
    rounds while it stores), else in float32."""
    if rate > 0.0:
        return _flash(q, k, v, key_bias, seeds, scale, rate)
    if (
        dispatch.bf16_row_attention(q.shape, q.dtype, kernels.amx_matmul_unavailable_reason)
        == "amx"
    ):
        return kernels.amx_attention(q, k, v, key_bias, scale=scale, out_dtype=out)
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    return kernels.cpu_attention(q, k, v, key_bias, scale=scale)
