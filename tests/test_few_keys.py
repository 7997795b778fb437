"""The few-keys attention kernel (the ViT's regrouped heads): forward and gradients against a
float64 loop, under vmap and a mesh, its refusals, and the ViT computing by it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_host_devices

from hw2jax import attention, kernels
from hw2jax.attention import dispatch
from hw2jax.errors import InputError

pytestmark = pytest.mark.skipif(
    kernels.build_error() is not None, reason=f"no fused CPU kernels: {kernels.build_error()}"
)


def reference64(q, kv, g):
    """out = softmax(q kv^T) kv and the gradients of <out, g>, one sequence and one query row
    at a time in float64: dS = P (g kv^T - sum_j P g kv^T), dq = dS kv, dkv = dS^T q + P^T g."""
    q, kv, g = (np.asarray(a, np.float64) for a in (q, kv, g))
    out, dq, dkv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(kv)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            s = kv[b] @ q[b, i]
            p = np.exp(s - s.max())
            p /= p.sum()
            out[b, i] = p @ kv[b]
            dp = kv[b] @ g[b, i]
            ds = p * (dp - p @ dp)
            dq[b, i] = ds @ kv[b]
            dkv[b] += np.outer(ds, q[b, i]) + np.outer(p, g[b, i])
    return out, dq, dkv


def inputs(b, m, n, d, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    q = (spread * rng.standard_normal((b, m, d)) / np.sqrt(d)).astype(np.float32)
    kv, g = (rng.standard_normal(s).astype(np.float32) for s in ((b, n, d), (b, m, d)))
    return q, kv, g


def kernel_and_gradients(q, kv, g):
    out, pullback = jax.vjp(kernels.cpu_few_keys_attention, jnp.asarray(q), jnp.asarray(kv))
    return (out, *pullback(jnp.asarray(g)))


# The ViT's (4 heads x 50 tokens against 50, width 64), its last block's (4 rows), row counts
# off the kernel's blocks of 6 (and of 3 at width 128), key counts in each of the 16-wide
# padded tiles, one key.
@pytest.mark.parametrize(
    "shape",
    [
        (2, 200, 50, 64),
        (3, 4, 50, 64),
        (2, 13, 17, 32),
        (2, 7, 64, 128),
        (1, 5, 33, 16),
        (2, 3, 1, 64),
    ],
)
def test_forward_and_gradients_match_float64(shape):
    q, kv, g = inputs(*shape, seed=sum(shape), spread=4.0)
    got = kernel_and_gradients(q, kv, g)
    for name, a, want in zip(("out", "dq", "dkv"), got, reference64(q, kv, g), strict=True):
        np.testing.assert_allclose(a, want, atol=2e-5, rtol=1e-4, err_msg=name)


def test_the_xla_form_agrees():
    q, kv, g = inputs(2, 24, 50, 64, seed=3)
    xla = lambda q, kv: attention.few_keys_attention(q, kv, implementation="xla")  # noqa: E731
    out, pullback = jax.vjp(xla, jnp.asarray(q), jnp.asarray(kv))
    for a, want in zip(
        kernel_and_gradients(q, kv, g), (out, *pullback(jnp.asarray(g))), strict=True
    ):
        np.testing.assert_allclose(a, want, atol=2e-5, rtol=1e-4)


def test_vmap_folds_into_the_batch():
    q, kv, g = inputs(2, 12, 20, 32, seed=4)
    stacked = lambda a: np.stack([a, a[::-1]])  # noqa: E731
    got = jax.vmap(kernels.cpu_few_keys_attention, in_axes=(0, None))(stacked(q), kv)
    np.testing.assert_allclose(got[1], reference64(q[::-1], kv, g)[0], atol=2e-5, rtol=1e-4)


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hw2jax import kernels
rng = np.random.default_rng(0)
q, g = (rng.standard_normal((6, 40, 32)).astype(np.float32) for _ in range(2))
kv = rng.standard_normal((6, 10, 32)).astype(np.float32)
f = jax.jit(jax.grad(lambda q, kv: jnp.sum(kernels.cpu_few_keys_attention(q, kv) * g), (0, 1)))
one_device = f(q, kv)
split = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
args = [jax.device_put(a, split) for a in (q, kv)]
hlo = f.lower(*args).compile().as_text()
calls = [line.split("=")[1].split("custom-call")[0].strip()
         for line in hlo.splitlines() if "few_keys" in line and "custom-call(" in line]
print("all-gather" in hlo)
print(sorted(set(calls)))
print(max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(f(*args), one_device)))
"""


def test_a_batch_split_over_devices_stays_split():
    """Forward and backward under a 2-device mesh: each device runs the kernels on its 3
    sequences, no all-gather, the gradients the one-device ones."""
    stdout = run_on_host_devices(_SHARDED)
    gathered, calls, error = stdout.splitlines()
    assert gathered == "False", stdout
    assert "f32[3,40,32]" in calls and "f32[6," not in calls, calls
    assert float(error) < 1e-5


@pytest.mark.parametrize(
    ("q_shape", "kv_shape", "dtype", "message"),
    [
        ((2, 5, 64), (2, 65, 64), jnp.float32, "kv must have 1 to 64 rows; got 65"),
        ((2, 5, 48), (2, 7, 48), jnp.float32, r"D must be one of \(16, 32, 64, 128\); got 48"),
        ((2, 5, 64), (2, 7, 64), jnp.bfloat16, "it computes in float32; got bfloat16"),
        ((2, 5, 64), (3, 7, 64), jnp.float32, r"it wants q \[B, M, D\] and kv \[B, N, D\]"),
        ((2, 5, 1, 64), (2, 7, 1, 64), jnp.float32, r"it wants q \[B, M, D\]"),
    ],
)
def test_inputs_it_cannot_take_are_refused_naming_the_alternative(
    q_shape, kv_shape, dtype, message
):
    with pytest.raises(InputError, match=f"cpu_few_keys_attention: {message}.*matmul_f32"):
        kernels.cpu_few_keys_attention(jnp.ones(q_shape, dtype), jnp.ones(kv_shape, dtype))


def test_asking_for_the_kernel_where_it_cannot_run_says_what_to_use():
    q, kv = jnp.ones((2, 5, 64)), jnp.ones((2, 65, 64))
    with pytest.raises(dispatch.ImplementationError, match=r"got 65\. Use implementation='auto'"):
        attention.few_keys_attention(q, kv, implementation="fused_cpu")
    # auto falls back to XLA's form there.
    want = attention.few_keys_attention(q, kv, implementation="xla")
    np.testing.assert_array_equal(attention.few_keys_attention(q, kv), want)
    for bad_q, bad_kv in ((q, kv[0]), (q[0], kv), (q[:, 0], kv), (q[:1], kv), (q[..., :32], kv)):
        with pytest.raises(InputError, match=r"few_keys_attention wants q \[B, M, D\] and kv"):
            attention.few_keys_attention(bad_q, bad_kv)
