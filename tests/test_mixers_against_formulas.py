"""Every registered variant, as the models call it, against a float64 formula written as a plain
loop: the registry's bindings (scaling, normalisation, gates) in float32 and in bfloat16, and the
ViT's attention block and the MQAR recall model's mixer with their projections, gates and norms
recomputed in float64 from the module's own parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import PHI_NP, ref_linear_np, ref_softmax_np
from test_decay_attention import gla_ref_np, retention_ref_np
from test_delta_rule import delta_ref, sliding_ref, taylor_linear_ref
from test_kernelized_attention import cosformer_ref_np, performer_ref_np

from hw2jax import attention
from hw2jax.attention import registry
from hw2jax.attention.decay import retention_decays
from hw2jax.models.recall import Mixer, mixer_options
from hw2jax.models.vit import Attention

PACKAGE_VARIANTS = [
    name
    for name in registry.names()
    if registry.get(name).fn.__module__.startswith("hw2jax.")  # not a test's own variant
]


def _l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _bidirectional_retention_ref(q, k, v):
    """out_i = sum_j gamma_h^|i - j| (q_i . k_j) v_j / sqrt(d), term by term."""
    gamma = np.asarray(retention_decays(q.shape[2]), np.float64)
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for i in range(q.shape[1]):
        for j in range(q.shape[1]):
            w = np.einsum("bhd,bhd->bh", q[:, i], k[:, j]) * gamma[None] ** abs(i - j)
            out[:, i] += w[..., None] * v[:, j] / math.sqrt(q.shape[-1])
    return out


def reference(name, q, k, v, causal, gates, options):
    """What the registered variant ``name`` computes, in float64 from the formulas' loops."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    gates = {g: np.asarray(a, np.float64) for g, a in gates.items()}
    d, options = q.shape[-1], registry.get(name).check_options(options)
    if name == "softmax":
        return ref_softmax_np(q, k, v, causal)
    if name == "linear":
        assert options["feature_map"] in PHI_NP
        return ref_linear_np(q, k, v, causal, options["feature_map"])
    if name == "performer":
        key = jax.random.key(options["seed"])
        w = attention.performer_projection(key, options["num_features"], d)
        return performer_ref_np(q, k, v, w, causal)
    if name == "cosformer":
        return cosformer_ref_np(q, k, v, causal)
    if name == "retention":
        if not causal:
            return _bidirectional_retention_ref(q, k, v)
        return retention_ref_np(q / math.sqrt(d), k, v, retention_decays(q.shape[2]))
    if name == "gla":
        return gla_ref_np(q / math.sqrt(d), k, v, gates["log_alpha"])
    if name == "ssd":
        log_alpha = np.broadcast_to(gates["head_log_alpha"][..., None], k.shape)
        return gla_ref_np(q / math.sqrt(d), k, v, log_alpha)
    if name in ("deltanet", "gated_deltanet"):
        log_alpha = gates.get("head_log_alpha", np.zeros(k.shape[:3]))
        return delta_ref(_l2n(q), _l2n(k), v, gates["beta"], log_alpha)
    if name == "sliding_window":
        return sliding_ref(q, k, v, options["window"])
    if name == "based":
        return taylor_linear_ref(q, k, v, causal)
    raise AssertionError(f"no float64 formula for {name}: add one here")


def _inputs(shape, seed, gates):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=shape) for _ in range(3))
    values = {
        "log_alpha": rng.uniform(-1.0, 0.0, shape),
        "head_log_alpha": rng.uniform(-1.0, 0.0, shape[:3]),
        "beta": rng.uniform(0.1, 1.0, shape[:3]),
    }
    return q, k, v, {g: values[g] for g in gates}


def _relative_error(out, ref):
    return np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)


def test_every_package_variant_has_a_formula_here():
    assert len(PACKAGE_VARIANTS) >= 11
    q, k, v, _ = _inputs((1, 3, 1, 4), 0, ())
    for name in PACKAGE_VARIANTS:
        variant = registry.get(name)
        gates = _inputs((1, 3, 1, 4), 0, variant.gates)[3]
        reference(name, q, k, v, variant.causal, gates, {})  # raises for a missing formula


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", PACKAGE_VARIANTS)
def test_each_variant_as_registered_matches_its_formula(name, dtype, tolerance):
    """Relative error (Frobenius) against float64 on the same rounded inputs: float32 to
    rounding, bfloat16 within a few of its 2^-8 steps (T = 40: sums over 40 terms)."""
    variant = registry.get(name)
    for causal in [c for c, has in ((True, variant.causal), (False, variant.bidirectional)) if has]:
        q, k, v, gates = _inputs((2, 40, 2, 8), seed=len(name), gates=variant.gates)
        cast = [jnp.asarray(a, dtype) for a in (q, k, v)]
        gates = {g: jnp.asarray(a, dtype) for g, a in gates.items()}
        out = variant.bind(causal=causal)(*cast, **gates)
        assert out.dtype == dtype
        rounded = [np.asarray(a.astype(jnp.float32), np.float64) for a in cast]
        gates64 = {g: np.asarray(a.astype(jnp.float32)) for g, a in gates.items()}
        ref = reference(name, *rounded, causal, gates64, {})
        assert _relative_error(out.astype(jnp.float32), ref) < tolerance, (name, causal)


@pytest.mark.parametrize("name", [n for n in PACKAGE_VARIANTS if registry.get(n).bidirectional])
def test_the_vit_attention_block_computes_its_variant(name):
    """x @ to_qkv split into heads, the variant's formula, then to_out, all in float64 from the
    block's parameters (the direct form: merge=False)."""
    dim, heads, dim_head = 12, 2, 8
    block = Attention(dim=dim, heads=heads, dim_head=dim_head, kind=name, merge=False)
    x = jax.random.normal(jax.random.key(1), (2, 17, dim))
    params = block.init(jax.random.key(0), x)["params"]
    out = block.apply({"params": params}, x)
    x64 = np.asarray(x, np.float64)
    qkv = x64 @ np.asarray(params["to_qkv"]["kernel"], np.float64)
    q, k, v = qkv.reshape(2, 17, 3, heads, dim_head).transpose(2, 0, 1, 3, 4)
    mixed = reference(name, q, k, v, False, {}, {}).reshape(2, 17, heads * dim_head)
    w, b = (np.asarray(params["to_out"][p], np.float64) for p in ("kernel", "bias"))
    assert _relative_error(out, mixed @ w + b) < 2e-5


def _dense(params, x):
    return x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("name", [n for n in PACKAGE_VARIANTS if registry.get(n).causal])
def test_the_recall_mixer_computes_its_variant(name):
    """The MQAR model's mixer: qkv, its gates (GLA's low-rank log-sigmoid / 16, a decay per
    head, DeltaNet's sigmoid beta), the causal formula, the head norm of un-normalised variants,
    then the output projection, recomputed in float64 from its parameters."""
    dim, heads, t = 16, 2, 19
    mixer = Mixer(dim=dim, heads=heads, kind=name)
    x = jax.random.normal(jax.random.key(1), (2, t, dim))
    params = mixer.init(jax.random.key(0), x)["params"]
    out = mixer.apply({"params": params}, x)
    x64, d = np.asarray(x, np.float64), dim // heads
    q, k, v = (a.reshape(2, t, heads, d) for a in np.split(_dense(params["qkv"], x64), 3, -1))
    gates = {}
    if "log_alpha" in registry.get(name).gates:
        low = _dense(params["gate_low_rank"], x64)
        gates["log_alpha"] = (_log_sigmoid(_dense(params["gate"], low)) / 16).reshape(k.shape)
    if "head_log_alpha" in registry.get(name).gates:
        gates["head_log_alpha"] = _log_sigmoid(_dense(params["decay"], x64)) / 16
    if "beta" in registry.get(name).gates:
        gates["beta"] = 1 / (1 + np.exp(-_dense(params["beta"], x64)))
    mixed = reference(name, q, k, v, True, gates, mixer_options(name, d))
    if not registry.get(name).normalised:
        mean = mixed.mean(-1, keepdims=True)
        var = ((mixed - mean) ** 2).mean(-1, keepdims=True)
        scale, bias = (np.asarray(params["head_norm"][p], np.float64) for p in ("scale", "bias"))
        mixed = (mixed - mean) / np.sqrt(var + 1e-6) * scale + bias
    expected = _dense(params["out"], mixed.reshape(2, t, dim))
    assert _relative_error(out, expected) < 5e-5
