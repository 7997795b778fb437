"""The one dispatch rule, with the device and the CPU faked both ways: what auto picks, and that
softmax, linear and BERT's attention all follow it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hw2jax import attention, kernels
from hw2jax.attention import dispatch

AVX512 = (("avx2", True), ("avx512f", True))
AVX2 = (("avx2", True), ("avx512f", False))
GPU = dispatch.Machine("gpu", nvidia=True)
T_256, T_8192 = 256 * 256, 8192 * 8192
DROPOUT = "attention dropout needs the probabilities"


def why(reason=None):
    """The rule's lazy question "why can the fused kernels not run?", answered ``reason``."""
    return lambda: reason


def never():
    raise AssertionError("asked whether the kernels can run where the rule cannot take them")


def test_gpu_takes_the_measured_paths_only():
    # JAX's own choice of cuDNN or XLA; our Pallas kernels only by name.
    for scores in (16, T_256, T_8192):
        for causal in (False, True):
            assert (
                dispatch.softmax(scores, causal, why("the fused kernel is for CPU"), GPU) == "jax"
            )
    assert dispatch.linear(why("the fused kernel is for CPU"), GPU) == "chunked"
    assert dispatch.key_bias(why("the fused kernel is for CPU"), GPU) == "xla"
    assert dispatch.softmax(16, False, why(), dispatch.Machine("tpu")) == "jax"


def test_the_kernels_are_not_asked_about_where_the_rule_cannot_take_them():
    # Asking builds the C++ kernels: a GPU or a CPU without AVX-512 never does.
    for machine in (GPU, dispatch.Machine("cpu", kernel_features=AVX2)):
        dispatch.softmax(T_256, True, never, machine)
        dispatch.linear(never, machine)
        dispatch.key_bias(never, machine)


def test_cpu_with_avx512_takes_the_fused_kernels_where_they_can_run():
    cpu = dispatch.Machine("cpu", kernel_features=AVX512)
    assert dispatch.softmax(50 * 50, False, why(), cpu) == ("row", "naive")
    assert dispatch.softmax(T_256, False, why(), cpu) == ("row", "flash")
    assert dispatch.softmax(T_256, True, why(), cpu) == ("flash", "flash")
    assert dispatch.softmax(T_8192, False, why(), cpu) == ("blockwise", "flash")
    assert dispatch.linear(why(), cpu) == "fused_cpu"
    assert dispatch.key_bias(why(), cpu) == "fused_cpu"
    # Where the kernels cannot run (bf16, an odd head dim, dropout): the plain paths.
    assert dispatch.softmax(T_256, False, why("bfloat16"), cpu) == "naive"
    assert dispatch.linear(why("head dim 8"), cpu) == "chunked"
    assert dispatch.key_bias(why(DROPOUT), cpu) == "xla"


def test_cpu_without_avx512_never_takes_the_fused_kernels():
    cpu = dispatch.Machine("cpu", kernel_features=AVX2)
    assert dispatch.softmax(T_256, True, why(), cpu) == "naive"
    assert dispatch.softmax(T_8192, False, why(), cpu) == "blockwise"
    assert dispatch.linear(why(), cpu) == "chunked"
    assert dispatch.key_bias(why(), cpu) == "xla"


def test_an_environment_variable_forces_one_path(monkeypatch):
    cpu = dispatch.Machine("cpu", kernel_features=AVX512)
    monkeypatch.setenv("HW2JAX_ATTENTION", "blockwise")
    assert dispatch.softmax(16, False, why(), cpu) == "blockwise"
    monkeypatch.setenv("HW2JAX_ATTENTION", "xla")
    assert dispatch.key_bias(why(), cpu) == "xla"
    monkeypatch.setenv("HW2JAX_ATTENTION", "fused_cpu")
    assert dispatch.softmax(16, False, why(), cpu) == "fused_cpu"
    assert dispatch.softmax(16, False, why("bfloat16"), cpu) == "naive"  # cannot run: the rule's
    assert dispatch.key_bias(why(DROPOUT), cpu) == "xla"  # dropout: the kernel cannot


def test_unknown_names_are_refused_naming_the_choices():
    q = jnp.ones((1, 4, 1, 16))
    for call, what in (
        (lambda: attention.softmax_attention(q, q, q, implementation="flash"), "softmax_attention"),
        (lambda: attention.linear_attention(q, q, q, implementation="flash"), "linear_attention"),
        (lambda: attention.key_bias_attention(q, q, q, implementation="fused"), "key_bias"),
    ):
        with pytest.raises(dispatch.ImplementationError, match=f"for {what}.*; use one of auto"):
            call()


@pytest.mark.parametrize("machine", ["gpu", "cpu_avx512", "cpu_avx2"])
def test_softmax_linear_and_bert_all_ask_the_rule(monkeypatch, machine):
    """With the machine faked, each public function computes by the rule's path: spies on the
    paths record which ran; values stay the float64 formula's."""
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    fake = {
        "gpu": GPU,
        "cpu_avx512": dispatch.Machine("cpu", kernel_features=AVX512),
        "cpu_avx2": dispatch.Machine("cpu", kernel_features=AVX2),
    }[machine]
    monkeypatch.setattr(dispatch, "this_machine", lambda: fake)
    ran = []
    real_dpa = jax.nn.dot_product_attention

    def dpa(*args, implementation=None, **kw):
        ran.append(f"dot_product_attention({implementation})")
        return real_dpa(*args, implementation=implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", dpa)
    for name in ("cpu_attention", "cpu_flash_attention", "linear_attention_cpu"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _n=name, _r=real, **k: ran.append(_n) or _r(*a, **k)
        )

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 12, 2, 16)), jnp.float32) for _ in range(3))
    out = attention.softmax_attention(q, k, v)
    s = np.einsum("bqhd,bkhd->bhqk", *(np.asarray(a, np.float64) for a in (q, k))) / 4.0
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), np.asarray(v, np.float64))
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    attention.linear_attention(q, k, v)
    attention.key_bias_attention(q, k, v, scale=0.25)
    expected = {
        "gpu": ["dot_product_attention(None)"],
        "cpu_avx512": ["cpu_attention", "linear_attention_cpu", "cpu_attention"],
        "cpu_avx2": [],
    }[machine]
    assert ran == expected
