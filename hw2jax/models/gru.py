"""A multi-layer, optionally bidirectional GRU with torch.nn.GRU's exact parameterisation.

flax's GRUCell has one bias per gate (plus one on the candidate's hidden path), 4 vectors
where torch has 6 (b_ih and b_hh for each of r, z, n). The parameters here carry torch's
names and shapes (``weight_ih_l0`` is [3H, in], gates in r, z, n order), so converting a
torch module is a plain copy.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.errors import InputError
from hw2jax.models.layers import dense_dot, torch_uniform


def _reverse_within_length(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverses each sequence's first ``length`` steps (x [T, B, ...]: axis 0), leaving the
    padding in place."""
    t = x.shape[0]
    idx = jnp.arange(t)[:, None]
    src = jnp.where(idx < lengths[None, :], lengths[None, :] - 1 - idx, idx)
    return jnp.take_along_axis(x, src[..., None], axis=0)


def _gates(xp, hp, hidden):
    """torch's GRU cell from the input part ``xp`` (W_ih x + b_ih) and the hidden part ``hp``
    (W_hh h + b_hh), both [..., 3H] in r, z, n order: (r, z, n)."""
    r = jax.nn.sigmoid(xp[..., :hidden] + hp[..., :hidden])
    z = jax.nn.sigmoid(xp[..., hidden : 2 * hidden] + hp[..., hidden : 2 * hidden])
    n = jnp.tanh(xp[..., 2 * hidden :] + r * hp[..., 2 * hidden :])
    return r, z, n


def _scan_forward(x_proj, w_hh, b_hh, valid, keep_residuals):
    """The recurrence, and with ``keep_residuals`` what the backward pass needs per step:
    the state before it, r, z, n and the candidate's hidden part, each [T, D, B, H]."""
    _, d, b, three_h = x_proj.shape
    hidden = three_h // 3
    # [D, H, 3H], transposed once here rather than inside each of the T steps.
    w_hh_t = jnp.swapaxes(w_hh, 1, 2)

    def step(h, inputs):
        xp, ok = inputs  # [D, B, 3H], [B]
        hp = jnp.einsum("dbh,dhg->dbg", h, w_hh_t) + b_hh[:, None, :]
        r, z, n = _gates(xp, hp, hidden)
        keep = ok[None, :, None]
        h_next = jnp.where(keep, (1.0 - z) * n + z * h, h)  # past a sequence's end: frozen
        saved = (h, r, z, n, hp[..., 2 * hidden :]) if keep_residuals else ()
        return h_next, (jnp.where(keep, h_next, 0.0), saved)

    h0 = jnp.zeros((d, b, hidden), x_proj.dtype)
    h, (out, saved) = jax.lax.scan(step, h0, (x_proj, valid.T))
    return out, h, saved


@jax.custom_vjp
def _scan_directions(x_proj, w_hh, b_hh, valid):
    """Scans all directions of one layer together (one loop, batched matmuls).

    Time-major, as the loop reads it: x_proj [T, D, B, 3H] holds W_ih x + b_ih, already
    reversed for the reverse direction; w_hh [D, 3H, H]; b_hh [D, 3H]; valid [B, T]. Returns
    outputs [T, D, B, H] and h [D, B, H].
    The backward pass is written out: autodiff of the scan accumulates dW_hh with one small
    matmul per step inside the loop; here the loop carries only dh, and dW_hh and db_hh are one
    matmul over all steps after it (benchmarks/results/gru_head/).
    """
    out, h, _ = _scan_forward(x_proj, w_hh, b_hh, valid, keep_residuals=False)
    return out, h


def _scan_directions_fwd(x_proj, w_hh, b_hh, valid):
    out, h, saved = _scan_forward(x_proj, w_hh, b_hh, valid, keep_residuals=True)
    return (out, h), (saved, w_hh, valid)


def _scan_directions_bwd(residuals, cotangents):
    (h_prev, r, z, n, hp_n), w_hh, valid = residuals
    g_out, g_h = cotangents  # [T, D, B, H], [D, B, H]

    def step(dh, inputs):
        g, ok, h0, r_t, z_t, n_t, hpn_t = inputs
        keep = ok[None, :, None]
        dh = dh + jnp.where(keep, g, 0.0)  # the output at this step is the new state
        dnew = jnp.where(keep, dh, 0.0)  # a frozen step passes dh straight through
        dn = dnew * (1.0 - z_t)
        da_z = dnew * (h0 - n_t) * z_t * (1.0 - z_t)
        da_n = dn * (1.0 - n_t * n_t)
        da_r = da_n * hpn_t * r_t * (1.0 - r_t)
        d_hp = jnp.concatenate([da_r, da_z, da_n * r_t], -1)  # d (W_hh h + b_hh)
        dh_prev = jnp.where(keep, dnew * z_t, dh) + jnp.einsum("dbg,dgh->dbh", d_hp, w_hh)
        return dh_prev, (jnp.concatenate([da_r, da_z, da_n], -1), d_hp)

    steps = (g_out, valid.T, h_prev, r, z, n, hp_n)
    _, (d_xp, d_hp) = jax.lax.scan(step, g_h, steps, reverse=True)
    # All steps in one matmul, contracted as h_prevᵀ d_hp: XLA then transposes the H-wide
    # h_prev rather than the 3H-wide d_hp.
    d_w = jnp.swapaxes(jnp.einsum("tdbh,tdbg->dhg", h_prev, d_hp), 1, 2)
    return d_xp, d_w, d_hp.sum((0, 2)), None


_scan_directions.defvjp(_scan_directions_fwd, _scan_directions_bwd)

IMPLEMENTATIONS = dispatch.RECURRENCE


def recurrence(
    x_proj: jax.Array,
    w_hh: jax.Array,
    b_hh: jax.Array,
    valid: jax.Array,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """All directions of one layer (shapes as :func:`_scan_directions`): outputs [T, D, B, H]
    and last states [D, B, H]. ``implementation``: ``"xla"`` (a ``lax.scan`` with a written-out
    backward pass), ``"fused_cpu"`` (:func:`hw2jax.kernels.gru_recurrence_cpu`: float32, H a
    multiple of 16, CPU) or ``"auto"`` (:func:`hw2jax.attention.dispatch.recurrence`, timed on
    CPU with gradients)."""
    reason = functools.partial(kernels.gru_unavailable_reason, x_proj, w_hh, b_hh, valid)
    path = dispatch.resolve_fused(
        implementation,
        IMPLEMENTATIONS,
        "the GRU's recurrence",
        reason,
        lambda: dispatch.recurrence(reason, measure=timed_paths(x_proj, w_hh, b_hh, valid)),
    )
    if path == "fused_cpu":
        return kernels.gru_recurrence_cpu(x_proj, w_hh, b_hh, valid)
    return _scan_directions(x_proj, w_hh, b_hh, valid)


def timed_paths(x_proj, w_hh, b_hh, valid) -> dispatch.Measure:
    """What auto times: both paths with gradients, over at most ``dispatch.PROBE_STEPS`` steps
    (the cost per step does not depend on T); one class per direction count, batch (to a power
    of two), hidden size and dtype."""
    t, d, b, three_h = x_proj.shape
    steps = min(t, dispatch.PROBE_STEPS)
    probe = [
        jax.ShapeDtypeStruct((steps, d, b, three_h), x_proj.dtype),
        jax.ShapeDtypeStruct(w_hh.shape, w_hh.dtype),
        jax.ShapeDtypeStruct(b_hh.shape, b_hh.dtype),
        jax.ShapeDtypeStruct((b, steps), jnp.bool_),
    ]
    size = (
        f"dirs {d} batch 2^{int(math.log2(max(b, 1)))} hidden {three_h // 3} "
        f"{jnp.dtype(x_proj.dtype).name}"
    )
    inputs = [x_proj, w_hh, b_hh, valid]
    return dispatch.Measure(
        inputs, lambda path: functools.partial(recurrence, implementation=path), size, probe
    )


class GRU(nn.Module):
    """``__call__(x [B, T, F], lengths=None) -> (outputs [B, T, D*H], h_n [L*D, B, H])``.

    ``lengths`` gives each sequence's true length (like a packed sequence in torch): the
    reverse direction then starts at each sequence's last real step, outputs past the end
    are 0, and h_n holds the state at the last real step. Dropout is applied between layers
    (not after the last), as torch does, when ``deterministic`` is False.
    """

    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    implementation: str = "auto"  # the recurrence's path: see recurrence()

    @nn.compact
    def __call__(
        self, x: jax.Array, lengths: jax.Array | None = None, *, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        if x.ndim != 3:
            raise InputError(f"GRU input must be [batch, time, features], got shape {x.shape}.")
        b, t, _ = x.shape
        h_size = self.hidden_size
        init = torch_uniform(h_size)  # torch: U(-1/sqrt(H), 1/sqrt(H)) for every GRU tensor
        if lengths is None:
            valid = jnp.ones((b, t), bool)
        else:
            lengths = jnp.asarray(lengths)
            valid = jnp.arange(t)[None, :] < lengths[:, None]

        def reverse(a: jax.Array) -> jax.Array:  # a [T, B, ...]
            return jnp.flip(a, 0) if lengths is None else _reverse_within_length(a, lengths)

        # Time-major from here to the end: the loop reads one step at a time, and each layer's
        # projection and output keep that layout rather than transposing [B, T, ...] tensors.
        x = jnp.swapaxes(x, 0, 1)

        finals = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0:
                # Drawn batch-major, as before the loop went time-major: a seed keeps its masks.
                drop = nn.Dropout(self.dropout)
                x = jnp.swapaxes(drop(jnp.swapaxes(x, 0, 1), deterministic=deterministic), 0, 1)
            suffixes = ("", "_reverse") if self.bidirectional else ("",)
            w_ih, w_hh, b_ih, b_hh = [], [], [], []
            for suffix in suffixes:
                name = f"l{layer}{suffix}"
                w_ih.append(self.param(f"weight_ih_{name}", init, (3 * h_size, x.shape[-1])))
                w_hh.append(self.param(f"weight_hh_{name}", init, (3 * h_size, h_size)))
                b_ih.append(self.param(f"bias_ih_{name}", init, (3 * h_size,)))
                b_hh.append(self.param(f"bias_hh_{name}", init, (3 * h_size,)))
            # All time steps and directions in one matmul; dense_dot's backward transposes x for
            # W_ih's gradient, not the projection's wider gradient.
            proj = dense_dot(x, jnp.concatenate(w_ih).T) + jnp.concatenate(b_ih)
            x_proj = jnp.split(proj, len(suffixes), axis=-1)
            if self.bidirectional:
                x_proj[1] = reverse(x_proj[1])
            out, h = recurrence(
                jnp.stack(x_proj, 1),
                jnp.stack(w_hh),
                jnp.stack(b_hh),
                valid,
                self.implementation,
            )
            directions = [out[:, 0], reverse(out[:, 1])] if self.bidirectional else [out[:, 0]]
            x = jnp.concatenate(directions, axis=-1)
            finals.extend(h)
        return jnp.swapaxes(x, 0, 1), jnp.stack(finals)


def params_from_torch(module: Any) -> dict[str, jax.Array]:
    """Params for :class:`GRU` from a ``torch.nn.GRU`` (names and shapes are the same)."""
    return {
        name: jnp.asarray(np.asarray(p.detach().cpu().numpy()))
        for name, p in module.named_parameters()
    }
