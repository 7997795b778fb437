"""The one dispatch rule, with the device and the CPU faked both ways: what auto picks, and that
softmax, linear and BERT's attention all follow it."""

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hw2jax.cpu
from hw2jax import attention, kernels
from hw2jax.attention import dispatch

AVX512 = (("avx2", True), ("avx512f", True))
AVX2 = (("avx2", True), ("avx512f", False))
NO_AVX2 = (("avx2", False), ("avx512f", False))  # an x86 before AVX2, or another ISA
GPU = dispatch.Machine("gpu", nvidia=True)
T_256, T_8192 = 256 * 256, 8192 * 8192
HEAD_DIM = "head dim must be a multiple of 16"


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
    assert dispatch.few_keys(never, GPU) == "xla"
    assert dispatch.softmax(16, False, why(), dispatch.Machine("tpu")) == "jax"


def test_the_kernels_are_not_asked_about_where_the_rule_cannot_take_them():
    # Asking builds the C++ kernels: a GPU or a CPU without AVX2 never does.
    for machine in (GPU, dispatch.Machine("cpu", kernel_features=NO_AVX2)):
        dispatch.softmax(T_256, True, never, machine)
        dispatch.linear(never, machine)
        dispatch.key_bias(never, machine)
        dispatch.few_keys(never, machine)
        dispatch.row_kernel(never, machine)


@pytest.mark.parametrize("features", [AVX512, AVX2], ids=["avx512", "avx2"])
def test_cpu_with_avx2_or_avx512_takes_the_fused_kernels_where_they_can_run(features):
    cpu = dispatch.Machine("cpu", kernel_features=features)
    assert dispatch.softmax(50 * 50, False, why(), cpu) == ("row", "naive")
    assert dispatch.softmax(T_256, False, why(), cpu) == ("row", "flash")
    assert dispatch.softmax(T_256, True, why(), cpu) == ("flash", "flash")
    assert dispatch.softmax(T_8192, False, why(), cpu) == ("blockwise", "flash")
    assert dispatch.linear(why(), cpu) == "fused_cpu"
    assert dispatch.key_bias(why(), cpu) == "fused_cpu"
    assert dispatch.few_keys(why(), cpu) == "fused_cpu"
    # Where the kernels cannot run (bf16, an odd head dim): the plain paths.
    assert dispatch.softmax(T_256, False, why("bfloat16"), cpu) == "naive"
    assert dispatch.linear(why("head dim 8"), cpu) == "chunked"
    assert dispatch.key_bias(why(HEAD_DIM), cpu) == "xla"
    assert dispatch.few_keys(why("kv must have 1 to 64 rows; got 65"), cpu) == "xla"


def test_cpu_without_avx2_never_takes_the_fused_kernels():
    cpu = dispatch.Machine("cpu", kernel_features=NO_AVX2)
    assert dispatch.softmax(T_256, True, why(), cpu) == "naive"
    assert dispatch.softmax(T_8192, False, why(), cpu) == "blockwise"
    assert dispatch.linear(why(), cpu) == "chunked"
    assert dispatch.key_bias(why(), cpu) == "xla"
    assert dispatch.few_keys(why(), cpu) == "xla"


def test_an_environment_variable_forces_one_path(monkeypatch):
    cpu = dispatch.Machine("cpu", kernel_features=AVX512)
    monkeypatch.setenv("HW2JAX_ATTENTION", "blockwise")
    assert dispatch.softmax(16, False, why(), cpu) == "blockwise"
    monkeypatch.setenv("HW2JAX_ATTENTION", "xla")
    assert dispatch.key_bias(why(), cpu) == "xla"
    monkeypatch.setenv("HW2JAX_ATTENTION", "fused_cpu")
    assert dispatch.softmax(16, False, why(), cpu) == "fused_cpu"
    assert dispatch.softmax(16, False, why("bfloat16"), cpu) == "naive"  # cannot run: the rule's
    assert dispatch.key_bias(why(HEAD_DIM), cpu) == "xla"  # the kernel cannot
    assert dispatch.few_keys(why(), cpu) == "fused_cpu"
    assert dispatch.few_keys(why("bfloat16"), cpu) == "xla"
    monkeypatch.setenv("HW2JAX_ATTENTION", "xla")
    assert dispatch.few_keys(why(), cpu) == "xla"


def test_unknown_names_are_refused_naming_the_choices():
    q = jnp.ones((1, 4, 1, 16))
    for call, what in (
        (lambda: attention.softmax_attention(q, q, q, implementation="flash"), "softmax_attention"),
        (lambda: attention.linear_attention(q, q, q, implementation="flash"), "linear_attention"),
        (lambda: attention.key_bias_attention(q, q, q, implementation="fused"), "key_bias"),
        (
            lambda: attention.few_keys_attention(q[:, :, 0], q[:, :, 0], implementation="row"),
            "few_keys_attention",
        ),
    ):
        with pytest.raises(dispatch.ImplementationError, match=f"for {what}.*; use one of auto"):
            call()


@pytest.mark.parametrize("machine", ["gpu", "cpu_avx512", "cpu_avx2", "cpu_no_avx2"])
def test_softmax_linear_and_bert_all_ask_the_rule(monkeypatch, machine):
    """With the machine faked, each public function computes by the rule's path: spies on the
    paths record which ran; values stay the float64 formula's."""
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    fake = {
        "gpu": GPU,
        "cpu_avx512": dispatch.Machine("cpu", kernel_features=AVX512),
        "cpu_avx2": dispatch.Machine("cpu", kernel_features=AVX2),
        "cpu_no_avx2": dispatch.Machine("cpu", kernel_features=NO_AVX2),
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
        "cpu_avx2": ["cpu_attention", "linear_attention_cpu", "cpu_attention"],
        "cpu_no_avx2": [],
    }[machine]
    assert ran == expected


# auto by measurement -------------------------------------------------------------------------

CPU_AVX512 = dispatch.Machine("cpu", kernel_features=AVX512)


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measuring on, a fresh cache file in ``tmp_path``, and timings faked: returns the dict of
    milliseconds per path that the fake probe reports, and the list of probes it ran."""
    monkeypatch.setenv("HW2JAX_AUTO", "measure")
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    monkeypatch.setattr(dispatch, "cache_file", lambda: tmp_path / "dispatch-test.json")
    ms, probes = {}, []  # ms by path, or by (path, with gradients)

    def fake(paths, measure, gradient, rule=None):
        probes.append((tuple(paths), gradient))
        return {name: ms.get((name, gradient), ms.get(name)) / 1e3 for name in paths}

    monkeypatch.setattr(dispatch, "time_paths", fake)
    return ms, probes


def measure_for(shape=(2, 256, 4, 64), dtype=jnp.float32):
    x = jax.ShapeDtypeStruct(shape, dtype)
    return dispatch.Measure((x, x, x), lambda path: None)


def test_auto_takes_the_measured_fastest_path_both_ways(measured):
    ms, probes = measured
    ms.update(row=1.0, flash=3.0, naive=2.0, blockwise=5.0)
    # Forward: the row kernel wins; gradients: naive's program beats the flash kernel.
    assert dispatch.softmax(T_256, False, why(), CPU_AVX512, measure_for()) == ("row", "naive")
    assert probes == [
        (("row", "flash", "naive", "blockwise"), False),
        (("flash", "naive", "blockwise"), True),
    ]
    # The opposite timings on another shape class pick the opposite paths: the flash kernel
    # forward too; naive on both sides is returned as one name (no custom VJP in between).
    ms.update(row=4.0, flash=0.5, naive=1.0)
    assert dispatch.softmax(T_256, False, why(), CPU_AVX512, measure_for((1, 256, 16, 64))) == (
        "flash",
        "flash",
    )
    assert dispatch.softmax(T_256, True, why(), CPU_AVX512, measure_for()) == ("flash", "flash")
    ms.update(flash=9.0)
    assert dispatch.softmax(T_256, True, why(), CPU_AVX512, measure_for((8, 256, 4, 64))) == "naive"
    # Linear and key bias: fused or not, by their timings, where the rule would say otherwise.
    ms.update(fused_cpu=1.0, chunked=2.0, xla=0.5)
    no_avx2 = dispatch.Machine("cpu", kernel_features=NO_AVX2)
    assert dispatch.linear(why(), no_avx2, measure_for(), causal=True) == "fused_cpu"
    assert dispatch.key_bias(why(), CPU_AVX512, measure_for()) == "xla"
    # The ViT's few-keys attention, timed with gradients: XLA's form here, the kernel when it
    # is the faster one, whatever the vector features.
    assert dispatch.few_keys(why(), CPU_AVX512, measure_for((2, 200, 1, 64))) == "xla"
    assert probes[-1] == (("fused_cpu", "xla"), True)
    ms.update(xla=3.0)
    assert dispatch.few_keys(why(), no_avx2, measure_for((2, 8, 1, 64))) == "fused_cpu"


def test_key_bias_times_forward_and_gradients_apart(measured):
    """BERT's attention: the row kernel may win forward while XLA's form wins with gradients;
    attention dropout is a class of its own, timed again."""
    ms, probes = measured
    ms.update({("fused_cpu", False): 1.0, ("xla", False): 2.0})
    ms.update({("fused_cpu", True): 5.0, ("xla", True): 2.0})
    assert dispatch.key_bias(why(), CPU_AVX512, measure_for()) == ("fused_cpu", "xla")
    assert probes == [(("fused_cpu", "xla"), False), (("fused_cpu", "xla"), True)]
    ms.update({("fused_cpu", True): 1.0})
    assert dispatch.key_bias(why(), CPU_AVX512, measure_for()) == ("fused_cpu", "xla")  # cached
    assert dispatch.key_bias(why(), CPU_AVX512, measure_for(), dropout=True) == "fused_cpu"
    assert len(probes) == 4
    assert {key.split(" full")[0] for key in dispatch.state.timings} == {
        "key_bias",
        "key_bias dropout",
    }


def rows_for(shape=(256, 50, 64), dtype=jnp.float32):
    vector = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)
    return dispatch.Measure((jax.ShapeDtypeStruct(shape, dtype), vector, vector), lambda p: None)


def test_row_kernels_take_the_measured_fastest_path_both_ways(measured):
    """Layer norms and BERT's bias + GELU: the kernel or XLA's by their timings, where the
    vector-feature rule would say otherwise; not timed where the kernel cannot run."""
    ms, probes = measured
    no_avx2 = dispatch.Machine("cpu", kernel_features=NO_AVX2)
    ms.update(fused_cpu=1.0, xla=2.0)
    assert dispatch.row_kernel(why(), no_avx2, rows_for(), "layer_norm", True) == "fused_cpu"
    assert dispatch.row_kernel(why(), no_avx2) == "xla"  # nothing to time: the rule
    assert probes == [(("fused_cpu", "xla"), True)]
    ms.update(fused_cpu=3.0)
    wide = rows_for((8, 256, 1536))
    assert dispatch.row_kernel(why(), CPU_AVX512, wide, "bias_gelu") == "xla"
    assert dispatch.row_kernel(why(), CPU_AVX512) == "fused_cpu"
    assert probes[-1] == (("fused_cpu", "xla"), False)
    assert dispatch.row_kernel(why("C is not a multiple of 16"), no_avx2, rows_for((4, 7))) == "xla"
    assert len(probes) == 2
    assert set(dispatch.state.timings) == {
        "layer_norm fwd+bwd rows 2^13 width 64 float32",
        "bias_gelu fwd rows 2^11 width 1536 float32",
    }


def test_bf16_dense_products_take_the_measured_fastest_path_both_ways(measured, monkeypatch):
    """The product kernel (AMX tiles, or AVX512-BF16 pair dots) or XLA's dot, by their timings
    with the output and both gradients kept, or forward alone, each a class of its own;
    untimed where the rule already says XLA's, or where $HW2JAX_MATMUL forces a path."""
    ms, probes = measured
    pair_dots = dispatch.Machine(
        "cpu", kernel_features=(("amx_bf16", False), ("avx512_bf16", True), ("avx512f", True))
    )
    dims = (((2,), (0,)), ((), ()))
    x, w = jnp.zeros((8, 128, 256), jnp.bfloat16), jnp.zeros((256, 512), jnp.bfloat16)

    def product(x, w, machine=pair_dots, gradient=True):
        size = f"rows 2^{int(math.log2(math.prod(x.shape[:-1])))} {w.shape[0]}x{w.shape[1]}"
        measure = lambda: dispatch.Measure((x, w), lambda p: None, size=size)  # noqa: E731
        return dispatch.dense_product(x, w, dims, why(), machine, measure, gradient)

    ms.update(amx=3.0, xla=1.0)
    assert product(x, w) == "xla"
    assert probes == [(("amx", "xla"), True)]
    ms.update(amx=1.0, xla=3.0)
    assert product(jnp.zeros((64, 128, 256), jnp.bfloat16), w) == "amx"
    assert product(x, w) == "xla"  # cached: its class keeps its timing
    assert len(probes) == 2
    # Forward alone, a class of its own: here the other path wins it.
    ms.update({("amx", False): 1.0, ("xla", False): 2.0})
    assert product(x, w, gradient=False) == "amx"
    assert probes[-1] == (("amx", "xla"), False)
    assert product(x, w) == "xla"  # the class with gradients keeps its own timing
    assert len(probes) == 3
    assert product(x[:1, :4], w) == "xla"  # below AMX_MIN_MACS: the rule's XLA, untimed
    assert product(x[:1, :4], w, gradient=False) == "xla"
    assert product(x, w, dispatch.Machine("cpu", kernel_features=AVX512)) == "xla"
    monkeypatch.setenv(dispatch.MATMUL_ENV, "amx")
    assert product(x, w) == "amx"
    monkeypatch.setenv(dispatch.MATMUL_ENV, "xla")
    assert product(x, w, gradient=False) == "xla"
    assert len(probes) == 3
    assert set(dispatch.state.timings) == {
        "bf16_dense fwd+bwd rows 2^10 256x512",
        "bf16_dense fwd+bwd rows 2^13 256x512",
        "bf16_dense fwd rows 2^10 256x512",
    }


def test_a_probe_with_a_cotangent_keeps_the_output_and_both_gradients():
    """bf16 products are timed as output and gradients of a given cotangent, all returned:
    the program computes x @ w, g @ w^T and x^T g (checked in float64), where a summed loss
    would let XLA fuse the product into its sum."""
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(shape) for shape in ((6, 5), (5, 3), (6, 3)))
    program = dispatch.probe_program(lambda a, b: a @ b, True, 3, cotangent=True)
    out, (dx, dw) = program(*(jnp.asarray(a, jnp.float32) for a in (x, w, g)))
    for got, want in ((out, x @ w), (dx, g @ w.T), (dw, x.T @ g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_near_tie_keeps_the_rules_path(measured):
    """Within 5 % or 0.25 ms of the fastest, the path the feature rule would take stays: tiny
    classes' timings swing by more than that, and a flip would change a run's rounding."""
    ms, _ = measured
    no_avx2 = dispatch.Machine("cpu", kernel_features=NO_AVX2)
    ms.update(fused_cpu=0.178, xla=0.064)  # the ViT's class-token layer norm, one probe
    assert dispatch.row_kernel(why(), CPU_AVX512, rows_for((256, 64)), "layer_norm", True) == (
        "fused_cpu"
    )
    assert dispatch.row_kernel(why(), no_avx2, rows_for((256, 64)), "layer_norm", True) == "xla"
    ms.update(fused_cpu=10.0, xla=9.6)  # 4 % apart: still the rule's
    assert dispatch.key_bias(why(), CPU_AVX512, measure_for()) == "fused_cpu"
    ms.update(fused_cpu=10.0, xla=9.4)  # 6 % and 0.6 ms: the timing wins
    assert dispatch.few_keys(why(), CPU_AVX512, measure_for((2, 200, 1, 64))) == "xla"
    ms.update(row=1.0, flash=1.04, naive=2.0, blockwise=5.0)  # causal: flash is the rule's
    assert dispatch.softmax(T_256, True, why(), CPU_AVX512, measure_for()) == ("flash", "flash")
    assert dispatch.choose({"a": 0.5, "b": 0.26}, ["a", "b"], "a") == "a"  # 0.24 ms
    assert dispatch.choose({"a": 0.5, "b": 0.24}, ["a", "b"], "a") == "b"  # 0.26 ms
    assert dispatch.choose({"a": 2.0, "b": 1.0}, ["a", "b"], "a") == "b"
    assert dispatch.choose({"a": 2.0, "b": 1.0}, ["a", "b"]) == "b"


def test_timings_are_cached_per_shape_class_in_one_file(measured, tmp_path):
    ms, probes = measured
    ms.update(row=1.0, flash=3.0, naive=2.0, blockwise=5.0)
    dispatch.softmax(T_256, False, why(), CPU_AVX512, measure_for())
    # A second process (its memory emptied) reads the file and times nothing.
    dispatch.state.timings.clear()
    ms.clear()
    assert dispatch.softmax(T_256, False, why(), CPU_AVX512, measure_for()) == ("row", "naive")
    assert len(probes) == 2
    record = json.loads((tmp_path / "dispatch-test.json").read_text())
    assert record["machine"]["cpu_model"] and "jax" in record["machine"]
    key = "softmax full fwd scores 2^16 rows 2^3 d 64x64 float32"
    assert record["classes"][key]["ms"] == {
        "row": 1.0,
        "flash": 3.0,
        "naive": 2.0,
        "blockwise": 5.0,
    }
    assert record["classes"][key]["method"] == dispatch.PROBE_METHOD
    # Timings taken another way (before the probe kept the outputs) are timed again.
    record["classes"][key].pop("method")
    (tmp_path / "dispatch-test.json").write_text(json.dumps(record))
    dispatch.state.timings.clear()
    ms.update(row=1.0, flash=3.0, naive=0.5, blockwise=5.0)
    assert dispatch.softmax(T_256, False, why(), CPU_AVX512, measure_for()) == "naive"
    assert len(probes) == 3 and probes[-1] == (("row", "flash", "naive", "blockwise"), False)
    # A damaged file is only a cache: timed again and rewritten.
    (tmp_path / "dispatch-test.json").write_text('{"classes": [trunc')
    dispatch.state.timings.clear()
    ms.update(row=1.0, flash=3.0, naive=0.5, blockwise=5.0)
    assert dispatch.softmax(T_256, False, why(), CPU_AVX512, measure_for()) == "naive"
    assert json.loads((tmp_path / "dispatch-test.json").read_text())["classes"][key]


def test_past_the_budget_and_elsewhere_the_feature_rule_stands(measured, monkeypatch, capsys):
    ms, probes = measured
    ms.update(row=9.0, flash=9.0, naive=1.0, blockwise=5.0, fused_cpu=9.0, xla=1.0)
    dispatch.state.seconds_spent = dispatch.PROBE_BUDGET_S
    assert dispatch.softmax(T_256, True, why(), CPU_AVX512, measure_for()) == ("flash", "flash")
    assert dispatch.key_bias(why(), CPU_AVX512, measure_for()) == "fused_cpu"
    said = capsys.readouterr().out.splitlines()  # once, when the rule first stands for it
    assert said == [
        "auto: this process has spent its 20 s of timing; the shape classes it has not timed "
        "(softmax causal fwd scores 2^16 rows 2^3 d 64x64 float32 first) take the "
        "vector-feature rule here, and a later run times them."
    ]
    dispatch.state.seconds_spent = 0.0
    assert dispatch.softmax(T_256, True, why(), GPU, measure_for()) == "jax"  # GPU: not timed
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # one program for every process
    assert dispatch.key_bias(why(), CPU_AVX512, measure_for()) == "fused_cpu"
    monkeypatch.undo()
    monkeypatch.setenv("HW2JAX_AUTO", "rule")
    assert dispatch.linear(why(), CPU_AVX512, measure_for(), causal=True) == "fused_cpu"
    assert probes == []
    monkeypatch.setenv("HW2JAX_AUTO", "fastest")
    with pytest.raises(dispatch.ImplementationError, match=r"HW2JAX_AUTO='fastest'.*'measure'"):
        dispatch.linear(why(), CPU_AVX512, measure_for())


def precision_for(size: str):
    """A model's precision probe: its paths cast x to the dtype named (traceable, so that the
    choices inside them are made before timing), its class named by ``size``."""
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    return lambda: dispatch.Measure((x,), lambda path: lambda x: x.astype(path), size=size)


def test_precision_takes_bf16_only_where_it_is_measured_faster(measured, monkeypatch):
    """The compute dtype of a model's auto: bf16 where its layer timed faster than in float32
    beyond the tie, float32 where it timed slower, whatever the vector features' rule says
    (a Xeon with AVX512-BF16 and no AMX), and float32 on a near tie (less rounding); the rule
    where nothing is timed."""
    ms, probes = measured
    ms.update(float32=100.0, bfloat16=50.0)
    got = dispatch.precision("float32", precision_for("AMX"), True, CPU_AVX512)
    assert got == ("bfloat16", {"float32": 100.0, "bfloat16": 50.0})
    assert probes == [(("float32", "bfloat16"), True)]
    assert "precision fwd+bwd AMX" in dispatch.state.timings
    ms.update(float32=60.0, bfloat16=100.0)
    assert dispatch.precision("bfloat16", precision_for("pair dots"), False, CPU_AVX512)[0] == (
        "float32"
    )
    ms.update(float32=100.0, bfloat16=96.0)  # 4 % faster: within the tie
    assert dispatch.precision("bfloat16", precision_for("tie"), True, CPU_AVX512)[0] == "float32"
    assert len(probes) == 3
    # Cached: the same class is not timed again, even by a fresh process.
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    assert dispatch.precision("float32", precision_for("AMX"), True, CPU_AVX512)[0] == "bfloat16"
    assert len(probes) == 3

    def untouched():
        raise AssertionError("the probe was built where nothing is timed")

    assert dispatch.precision("bfloat16", untouched, True, GPU) == ("bfloat16", None)
    monkeypatch.setenv("HW2JAX_AUTO", "rule")
    assert dispatch.precision("float32", untouched, True, CPU_AVX512) == ("float32", None)
    monkeypatch.setenv("HW2JAX_AUTO", "measure")
    dispatch.state.seconds_spent = dispatch.PROBE_BUDGET_S
    assert dispatch.precision("bfloat16", precision_for("late"), True, CPU_AVX512) == (
        "bfloat16",
        None,
    )
    assert len(probes) == 3


def test_a_lock_held_elsewhere_too_long_leaves_the_rule_and_says_so(
    measured, monkeypatch, tmp_path, capsys
):
    """A process that holds the cache's lock past LOCK_WAIT_S (stopped, stuck) is not waited
    on for ever: this process takes the rule for the classes it has not timed, and says why."""
    import fcntl

    ms, probes = measured
    ms.update(fused_cpu=3.0, xla=1.0)
    monkeypatch.setattr(dispatch, "LOCK_WAIT_S", 0.2)
    with open(tmp_path / "dispatch-test.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another holder, as far as flock can tell
        assert dispatch.row_kernel(why(), CPU_AVX512, rows_for(), "layer_norm", True) == (
            "fused_cpu"
        )
        fcntl.flock(held, fcntl.LOCK_UN)
    assert probes == []
    out = capsys.readouterr().out
    assert "another process has held" in out and "dispatch-test.lock for over 0 s" in out
    assert dispatch.row_kernel(why(), CPU_AVX512, rows_for(), "layer_norm", True) == "fused_cpu"
    assert capsys.readouterr().out == ""  # said once: not again as a spent budget
    dispatch.state.seconds_spent = 0.0  # a later process: it times the class
    assert dispatch.row_kernel(why(), CPU_AVX512, rows_for(), "layer_norm", True) == "xla"
    assert len(probes) == 1


def test_a_recording_inside_another_adds_to_the_outer_one(measured):
    """A task's choices made before its loop (the encoder's dtype) and the loop's own land in
    one record; outside any recording nothing is kept."""
    ms, _ = measured
    ms.update(fused_cpu=1.0, xla=2.0)
    dispatch.row_kernel(why(), CPU_AVX512, rows_for((64, 32)), "layer_norm", True)
    with dispatch.recording() as outer:
        dispatch.row_kernel(why(), CPU_AVX512, rows_for(), "layer_norm", True)
        with dispatch.recording() as inner:
            dispatch.row_kernel(why(), CPU_AVX512, rows_for((8, 256, 1536)), "bias_gelu")
        assert inner is outer
    assert sorted(outer) == [
        "bias_gelu fwd rows 2^11 width 1536 float32",
        "layer_norm fwd+bwd rows 2^13 width 64 float32",
    ]
    assert all(record["path"] == "fused_cpu" for record in outer.values())


def test_probes_stay_small_whatever_the_call(monkeypatch):
    monkeypatch.setattr(hw2jax.cpu, "usable_cores", lambda: 2)
    big = measure_for((64, 65536, 8, 64)).inputs
    # T cut to 8,192, and one (batch, head) row per core: the kernels spread rows over cores.
    assert [p.shape for p in dispatch.probe_inputs(big, abstract=True)] == [(1, 8192, 2, 64)] * 3
    assert dispatch.shape_class("softmax", True, True, big) == dispatch.shape_class(
        "softmax", True, True, measure_for((64, 8192, 8, 64)).inputs
    )
    one_row = measure_for((1, 4096, 1, 64)).inputs  # fewer rows than cores: as they are
    assert [p.shape for p in dispatch.probe_inputs(one_row, abstract=True)] == [
        (1, 4096, 1, 64)
    ] * 3
    rows = rows_for((64, 4096, 384)).inputs  # row operations: at most PROBE_ROWS rows
    assert [p.shape for p in dispatch.probe_inputs(rows, abstract=True)] == [
        (dispatch.PROBE_ROWS, 384),
        (384,),
        (384,),
    ]
    vit = measure_for((256, 50, 4, 16)).inputs  # 2^22 scores in all: timed at its own size
    assert [p.shape for p in dispatch.probe_inputs(vit, abstract=True)] == [(256, 50, 4, 16)] * 3
    # One head: the batch is cut, but to no fewer rows than cores.
    one_head = measure_for((4, 65536, 1, 64)).inputs
    assert [p.shape for p in dispatch.probe_inputs(one_head, abstract=True)] == [
        (2, 8192, 1, 64)
    ] * 3
    # Exactly PROBE_SCORES scores in all is kept; twice as many rows is cut back to it.
    for shape, probed in [
        ((4, 2048, 1, 64), (4, 2048, 1, 64)),
        ((8, 2048, 1, 64), (4, 2048, 1, 64)),
        ((1, 2048, 4, 64), (1, 2048, 4, 64)),
        ((1, 2048, 8, 64), (1, 2048, 4, 64)),
    ]:
        assert math.prod(probed[:3]) * probed[1] == dispatch.PROBE_SCORES
        inputs = measure_for(shape).inputs
        assert [p.shape for p in dispatch.probe_inputs(inputs, abstract=True)] == [probed] * 3


def test_a_forced_path_is_never_timed(measured, monkeypatch):
    _, probes = measured
    monkeypatch.setenv("HW2JAX_ATTENTION", "blockwise")
    assert dispatch.softmax(T_256, True, why(), CPU_AVX512, measure_for()) == "blockwise"
    assert probes == []


@pytest.mark.parametrize("fastest", ["naive_then_blockwise", "blockwise_then_naive"])
def test_mixed_forward_and_gradient_paths_keep_the_formula(measured, fastest):
    """Measurement can pair any forward with any gradient (XLA's forms included, where the
    feature rule pairs only the kernels): values and gradients stay the float64 formula's."""
    ms, _ = measured
    first, second = fastest.split("_then_")
    ms.update({"row": 9.0, "flash": 9.0, first: 1.0, second: 2.0})
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 40, 2, 16)), jnp.float32) for _ in range(3))

    def formula(q, k, v):
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
        s = np.where(np.tril(np.ones((40, 40), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)

    qkv64 = [np.asarray(a, np.float64) for a in (q, k, v)]
    out = attention.softmax_attention(q, k, v, causal=True)
    np.testing.assert_allclose(out, formula(*qkv64), rtol=2e-5, atol=2e-5)
    w = np.asarray(rng.standard_normal(out.shape))
    grads = jax.grad(
        lambda *a: jnp.sum(attention.softmax_attention(*a, causal=True) * w), argnums=(0, 1, 2)
    )(q, k, v)
    eps = 1e-6  # central differences of the float64 formula along one random direction each
    for i, g in enumerate(grads):
        d = rng.standard_normal(qkv64[i].shape)
        plus, minus = list(qkv64), list(qkv64)
        plus[i], minus[i] = qkv64[i] + eps * d, qkv64[i] - eps * d
        numeric = np.sum((formula(*plus) - formula(*minus)) * w) / (2 * eps)
        np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * d), numeric, rtol=1e-4)


def test_a_real_probe_times_every_candidate_and_takes_the_least(monkeypatch, tmp_path):
    """Unfaked: timing a small class writes a time for each candidate, and auto's choice is the
    least of them."""
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    monkeypatch.setenv("HW2JAX_AUTO", "measure")
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    monkeypatch.setattr(dispatch, "cache_file", lambda: tmp_path / "dispatch-test.json")
    q = jnp.ones((2, 32, 2, 16), jnp.float32)
    paths = attention.softmax.timed_paths(q, q, q, causal=True)
    choice = dispatch.softmax(32 * 32, True, why(), dispatch.this_machine(), paths)
    classes = json.loads((tmp_path / "dispatch-test.json").read_text())["classes"]
    (fwd,) = (c["ms"] for key, c in classes.items() if "fwd+bwd" not in key)
    (grad,) = (c["ms"] for key, c in classes.items() if "fwd+bwd" in key)
    assert set(fwd) == {"flash", "naive", "blockwise"} and set(grad) == set(fwd)
    assert all(ms > 0 for ms in [*fwd.values(), *grad.values()])
    # The least of each, or the rule's path where it is within the tie: at 32 x 32 scores the
    # flash kernel forward and naive's gradient where the kernels pay off, else naive's.
    pays = dispatch.this_machine().fused_cpu_pays_off
    rule = ("flash", "naive") if pays else ("naive", "naive")
    best = tuple(dispatch.choose(ms, list(ms), r) for ms, r in zip((fwd, grad), rule, strict=True))
    # One of XLA's forms both ways is one name; the flash kernel keeps its pair.
    assert choice == (best[0] if best[0] == best[1] != "flash" else best)
    assert 0 < dispatch.state.seconds_spent < dispatch.PROBE_BUDGET_S


def test_a_real_probe_of_a_layer_norm_times_both_paths(monkeypatch, tmp_path):
    """Unfaked: the layer norm's first call times the kernel and flax's form, with gradients,
    and computes by the faster one the float64 formula's values."""
    from hw2jax.models.layers import LayerNorm

    if kernels.build_error():
        pytest.skip(f"the fused CPU kernel cannot be built here: {kernels.build_error()}")
    monkeypatch.setenv("HW2JAX_AUTO", "measure")
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    monkeypatch.setattr(dispatch, "cache_file", lambda: tmp_path / "dispatch-test.json")
    x = np.random.default_rng(3).standard_normal((3, 10, 32))
    norm = LayerNorm(epsilon=1e-5)
    params = {"params": {"scale": jnp.full(32, 1.5), "bias": jnp.full(32, 0.25)}}
    got = jax.jit(norm.apply)(params, jnp.asarray(x, jnp.float32))
    centred = x - x.mean(-1, keepdims=True)
    want = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * 1.5 + 0.25
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    classes = json.loads((tmp_path / "dispatch-test.json").read_text())["classes"]
    assert classes["layer_norm fwd+bwd rows 2^4 width 32 float32"]["probe_shapes"] == [
        [30, 32],
        [32],
        [32],
    ]
    assert all(
        ms > 0 for ms in classes["layer_norm fwd+bwd rows 2^4 width 32 float32"]["ms"].values()
    )


def test_the_gru_recurrence_takes_the_measured_fastest_path_both_ways(measured, monkeypatch):
    """The GRU's recurrence: the kernel or the scan by their timings with gradients (over at
    most PROBE_STEPS steps, one class per directions, batch, hidden size and dtype), where the
    vector-feature rule would say otherwise; not timed where the kernel cannot run or a path is
    forced."""
    from hw2jax.models.gru import timed_paths

    def gru_measure(steps, batch, hidden=256):
        shapes = [(steps, 2, batch, 3 * hidden), (2, 3 * hidden, hidden), (2, 3 * hidden)]
        inputs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
        return timed_paths(*inputs, jax.ShapeDtypeStruct((batch, steps), jnp.bool_))

    ms, probes = measured
    no_avx2 = dispatch.Machine("cpu", kernel_features=NO_AVX2)
    ms.update(fused_cpu=1.0, xla=2.0)
    assert dispatch.recurrence(why(), no_avx2, gru_measure(512, 128)) == "fused_cpu"
    assert probes == [(("fused_cpu", "xla"), True)]
    timed = dispatch.state.timings["gru fwd+bwd dirs 2 batch 2^7 hidden 256 float32"]
    assert timed["probe_shapes"] == [[64, 2, 128, 768], [2, 768, 256], [2, 768], [128, 64]]
    ms.update(fused_cpu=3.0)
    assert dispatch.recurrence(why(), CPU_AVX512, gru_measure(40, 32)) == "xla"
    assert len(probes) == 2
    # The same classes again: from the cache, whatever T.
    assert dispatch.recurrence(why(), no_avx2, gru_measure(7, 128)) == "fused_cpu"
    assert len(probes) == 2
    # Nothing to time: the rule. Where the kernel cannot run, or a path is forced: never timed.
    assert dispatch.recurrence(why(), CPU_AVX512) == "fused_cpu"
    assert dispatch.recurrence(why(), no_avx2) == "xla"
    assert dispatch.recurrence(why("H is 5"), CPU_AVX512, gru_measure(8, 3)) == "xla"
    monkeypatch.setenv("HW2JAX_RECURRENCE", "xla")
    assert dispatch.recurrence(why(), CPU_AVX512, gru_measure(8, 3)) == "xla"
    assert len(probes) == 2
    monkeypatch.setenv("HW2JAX_RECURRENCE", "scan")
    with pytest.raises(dispatch.ImplementationError, match=r"\$HW2JAX_RECURRENCE.*fused_cpu"):
        dispatch.recurrence(why(), CPU_AVX512)


def test_best_times_take_turns_and_give_up_on_a_loser_whichever_ran_first(monkeypatch):
    """best_times's runs on a fake clock: every program warmed up, then the best of three runs
    each, in turns (a b, b a, a b); fewer once a program's runs pass half a second, or once its
    best is over LOSING_FACTOR times another's best and over LOSING_MIN_MS, the first program
    timed included."""
    clock, calls = [0.0], []
    monkeypatch.setattr(dispatch.time, "perf_counter", lambda: clock[0])

    def timed(**durations):
        clock[0], runs = 0.0, {name: iter(d) for name, d in durations.items()}
        calls.clear()

        def program(name):
            def run(*inputs):
                calls.append(name)
                clock[0] += next(runs[name])
                return np.zeros(())

            return run

        return dispatch.best_times({name: program(name) for name in durations}, [1, 2])

    # The warm-ups (9 s, 0 s) are not counted.
    best = timed(a=[9.0, 0.375, 0.125, 0.25], b=[0.0, 0.25, 0.1875, 0.25])
    assert best == {"a": 0.125, "b": 0.1875}
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert timed(a=[0.0, 0.25, 0.25, 0.125]) == {"a": 0.125}  # half a second exactly: on
    assert timed(a=[0.0, 0.25, 0.25 + 2**-10]) == {"a": 0.25}  # past it: stops
    assert calls == ["a"] * 3
    beaten = 2.0**-8  # b's best: LOSING_FACTOR times it is 2^-7 s, over 5 ms
    assert timed(a=[0.0, 2**-7, 2**-7, 2**-7], b=[0.0] + [beaten] * 3)["a"] == 2**-7
    assert calls.count("a") == 4
    assert timed(a=[0.0, 2**-7 + 2**-20], b=[0.0] + [beaten] * 3)["a"] == 2**-7 + 2**-20
    assert calls == ["a", "b", "a", "b", "b", "b"]  # a, timed first, lost to b: run no more
    # Under LOSING_MIN_MS a run is kept on, however far behind another path's best.
    timed(a=[0.0, 0.005, 0.001, 0.001], b=[0.0] + [2.0**-14] * 3)
    assert calls.count("a") == 4
    timed(a=[0.0, 0.005 + 2**-20], b=[0.0] + [2.0**-14] * 3)
    assert calls.count("a") == 2


def test_a_slow_patch_falls_on_every_paths_runs_alike(monkeypatch):
    """A patch of the machine that slows three runs 2x, from the first timed run: one path's
    runs after another's would all fall inside it and send the class to the slower path (a at
    10 ms, b at 12); in turns each path keeps a run outside it."""
    clock, calls = [0.0], []
    monkeypatch.setattr(dispatch.time, "perf_counter", lambda: clock[0])
    own = {"a": 0.010, "b": 0.012}

    def program(name):
        def run():
            calls.append(name)
            timed_runs = len(calls) - len(own)  # after the warm-ups
            clock[0] += own[name] * (2 if 1 <= timed_runs <= 3 else 1)
            return np.zeros(())

        return run

    best = dispatch.best_times({name: program(name) for name in own}, [])
    assert best["a"] == pytest.approx(own["a"])  # (b's runs, both slowed, lost to a's)
    ms = {name: 1e3 * seconds for name, seconds in best.items()}
    assert dispatch.choose(ms, ["a", "b"], "b") == "a"


def test_a_probe_with_gradients_times_the_outputs_too():
    """The probe times a path's gradients with its outputs computed, as a training step runs
    it: naive softmax's program keeps both forward products (3 × 2 in all, not 5 with P v
    dropped)."""
    q, k, v = (jnp.ones((1, 64, 2, 16)) for _ in range(3))

    def naive(q, k, v):
        return attention.softmax_attention(q, k, v, implementation="naive")

    def products(gradient):
        program = jax.jit(dispatch.probe_program(naive, gradient, 3)).lower(q, k, v).compile()
        return sum(" dot(" in line for line in program.as_text().split("\n"))

    assert products(False) == 2
    assert products(True) == 6
    value, grads = jax.jit(dispatch.probe_program(naive, True, 3))(q, k, v)
    assert float(value) == pytest.approx(float(jnp.sum(naive(q, k, v))))
    assert len(grads) == 3


def host_call_paths(events: list, sleeps: dict) -> dispatch.Measure:
    """Paths that are host calls: each run notes the path's name in ``events`` and sleeps
    ``sleeps[name](n)`` seconds, n the number of runs noted so far, so a test sets each run's
    time."""

    def path(name):
        def note(x):
            events.append(name)
            time.sleep(sleeps[name](len(events)))
            return x

        return lambda x: jax.pure_callback(note, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    return dispatch.Measure((x,), path, size="test", probe=[x])


def test_the_paths_compile_together_then_run_one_at_a_time_and_a_clear_loser_runs_once(
    monkeypatch,
):
    """Unfaked timing of two paths, one a host call that sleeps 30 ms: every program compiles
    before any runs; both are warmed up, then run in turns; the slow path, over twice the
    other's time, runs once after its warm-up, whichever is timed first, the other four
    times in all."""
    events = []
    compile_program = jax.stages.Lowered.compile

    def compile_and_note(self, *args, **kwargs):
        events.append("compiled")
        return compile_program(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_and_note)
    measure = host_call_paths(events, {"fast": lambda n: 0.0, "slow": lambda n: 0.03})
    for order in (("fast", "slow"), ("slow", "fast")):
        events.clear()
        seconds = dispatch.time_paths(order, measure, gradient=False)
        assert events[:2] == ["compiled", "compiled"]
        assert events[2:] == [*order, *order, "fast", "fast"]  # warm-ups, a round, the rest
        assert seconds["fast"] < 0.03 <= seconds["slow"]


def test_a_timing_that_overturns_the_rule_is_taken_again():
    """Unfaked timing of a rule's path slowed in its first runs (30 ms, then none) against a
    path that takes 10 ms: the paths run a second time, each keeping its best of both, and the
    rule's path wins. Where the rule's path was the faster, or no rule is given, they run once;
    where the rule's path is slow in both rounds, the other keeps the class."""
    events = []

    def timed(kernel_sleeps, rule, xla_sleeps=lambda n: 0.01):
        events.clear()
        measure = host_call_paths(events, {"kernel": kernel_sleeps, "xla": xla_sleeps})
        return dispatch.time_paths(["kernel", "xla"], measure, gradient=False, rule=rule)

    slowed_at_first = lambda n: 0.03 if n <= 4 else 0.0  # noqa: E731
    seconds = timed(slowed_at_first, rule="kernel")
    # Each round: the warm-ups, then turns until one path is past twice the other's time.
    first = ["kernel", "xla", "kernel", "xla", "xla", "xla"]
    assert events == [*first, "kernel", "xla", "kernel", "xla", "kernel", "kernel"]
    assert seconds["kernel"] < 0.01 <= seconds["xla"]
    ms = {name: s * 1e3 for name, s in seconds.items()}
    assert dispatch.choose(ms, ["kernel", "xla"], "kernel") == "kernel"
    for rule in ("xla", None):  # not overturned: one round
        seconds = timed(slowed_at_first, rule)
        assert events == first
        assert seconds["xla"] < 0.03 <= seconds["kernel"]
    # Slow both times: the timing stands, and each path keeps its best of both rounds (XLA's
    # path here slower in the second).
    xla_sleeps = lambda n: 0.01 if n <= 8 else 0.02  # noqa: E731
    seconds = timed(lambda n: 0.03, rule="kernel", xla_sleeps=xla_sleeps)
    # The second round: 30 ms against 20 is within twice, so both run three times.
    second = ["kernel", "xla", "kernel", "xla", "xla", "kernel", "kernel", "xla"]
    assert events == [*first, *second]
    assert seconds["xla"] < 0.02 and seconds["xla"] < 0.03 <= seconds["kernel"]


def test_a_near_tie_with_the_rule_is_not_timed_again(monkeypatch):
    """The second round is for timings that overturn the rule: a path within the tie margin of
    the rule's (5 %) leaves the rule standing, so the paths run once."""
    readings = []

    def best_times(programs, inputs):
        return {name: readings.pop(0) for name in programs}

    monkeypatch.setattr(dispatch, "best_times", best_times)
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    measure = dispatch.Measure((x,), lambda name: lambda x: x, size="test", probe=[x])
    readings[:] = [0.0104, 0.0100, 0.0, 0.0]  # kernel, xla; then a second round's
    assert dispatch.time_paths(["kernel", "xla"], measure, False, rule="kernel") == {
        "kernel": 0.0104,
        "xla": 0.0100,
    }
    assert len(readings) == 2  # not run again
    readings[:] = [0.0110, 0.0100, 0.0120, 0.0090]  # 9 % apart: a second round, best of both
    assert dispatch.time_paths(["kernel", "xla"], measure, False, rule="kernel") == {
        "kernel": 0.0110,
        "xla": 0.0090,
    }
    assert readings == []


def test_the_probe_is_told_the_rules_path(measured, monkeypatch):
    """time_paths hears which path the feature rule would take, so that it can time again a
    result that overturns it: the kernel on an AVX-512 CPU, XLA's form without AVX2."""
    rules = []

    def fake(paths, measure, gradient, rule=None):
        rules.append(rule)
        return {name: 1e-3 for name in paths}

    monkeypatch.setattr(dispatch, "time_paths", fake)
    no_avx2 = dispatch.Machine("cpu", kernel_features=NO_AVX2)
    dispatch.row_kernel(why(), CPU_AVX512, rows_for(), "layer_norm", True)
    dispatch.row_kernel(why(), no_avx2, rows_for((512, 64)), "layer_norm", True)
    assert rules == ["fused_cpu", "xla"]


@pytest.fixture
def load(monkeypatch):
    """Other processes' share of the cores while a class is timed, as hw2jax.cpu.others_busy
    would read it: set ``load["share"]`` before the timing."""
    import contextlib

    share = {"share": 0.0}

    @contextlib.contextmanager
    def others_busy():
        reading = {"share": None}
        yield reading
        reading["share"] = share["share"]

    monkeypatch.setattr(hw2jax.cpu, "others_busy", others_busy)
    return share


def test_a_class_timed_beside_other_work_is_timed_again_by_the_next_process(
    measured, load, monkeypatch, tmp_path, capsys
):
    """A busy core slows paths unevenly: a class timed while other processes took over a
    tenth of the cores is timed again by the next process, each path keeping its best, until
    a timing runs without such load (then kept) or LOADED_TIMINGS have run with it."""
    ms, probes = measured
    layer_norm = "layer_norm fwd+bwd rows 2^13 width 64 float32"

    def row_path():
        return dispatch.row_kernel(why(), CPU_AVX512, rows_for(), "layer_norm", True)

    def cached():
        return json.loads((tmp_path / "dispatch-test.json").read_text())["classes"][layer_norm]

    load["share"] = 0.6
    ms.update(fused_cpu=6.0, xla=4.0)
    assert row_path() == "xla"
    assert capsys.readouterr().out == (
        "auto: other processes took 60 % of this process's cores while it timed "
        f"{layer_norm}; this run takes the path that timing chose, and later runs time such "
        "classes again (up to 3 timings beside other work) before the cache keeps them.\n"
    )
    assert cached()["others_busy_share"] == 0.6 and cached()["loaded_timings"] == 1
    assert row_path() == "xla" and len(probes) == 1  # not again in the process that timed it
    dispatch.restart_budget()  # a benchmark's next row: it would share the load
    assert row_path() == "xla" and len(probes) == 1
    dispatch.row_kernel(why(), CPU_AVX512, rows_for((8, 50, 64)), "layer_norm", True)
    assert len(probes) == 2 and capsys.readouterr().out == ""  # said once a process
    # The next process, on idle cores: timed again, each path its best of both timings.
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    load["share"] = 0.0
    ms.update(fused_cpu=3.0, xla=4.5)
    assert row_path() == "fused_cpu" and len(probes) == 3
    assert cached()["ms"] == {"fused_cpu": 3.0, "xla": 4.0}
    assert cached()["others_busy_share"] == 0.0 and cached()["loaded_timings"] == 1
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    assert row_path() == "fused_cpu" and len(probes) == 3  # kept: timed without load
    # Beside other work every time: timed by three processes, then kept.
    (tmp_path / "dispatch-test.json").unlink()
    load["share"] = 0.15
    for timings, (fused, xla) in enumerate([(5.0, 4.0), (3.0, 4.5), (6.0, 3.5)], start=1):
        monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
        ms.update(fused_cpu=fused, xla=xla)
        row_path()
        assert cached()["loaded_timings"] == timings and len(probes) == 3 + timings
    assert cached()["ms"] == {"fused_cpu": 3.0, "xla": 3.5}
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    assert row_path() == "fused_cpu" and len(probes) == 6
    # At the limit itself the share is no load; a reading of none (too short) is none either.
    for share in (dispatch.LOADED_SHARE, None):
        (tmp_path / "dispatch-test.json").unlink()
        monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
        load["share"] = share
        row_path()
        monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
        count = len(probes)
        row_path()
        assert len(probes) == count and cached()["loaded_timings"] == 0
    assert capsys.readouterr().out.count("auto: other processes took") == 3


def test_past_the_budget_a_class_timed_beside_other_work_keeps_its_timing(
    measured, load, monkeypatch, tmp_path, capsys
):
    """A process with no budget left, or locked out, does not time a loaded class again: it
    takes what the class's timing said, not the feature rule."""
    import fcntl

    ms, probes = measured
    load["share"] = 0.6
    ms.update(fused_cpu=6.0, xla=4.0)
    assert dispatch.row_kernel(why(), CPU_AVX512, rows_for(), "layer_norm", True) == "xla"
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    dispatch.state.timings.update(dispatch.cached_timings(tmp_path / "dispatch-test.json"))
    dispatch.state.seconds_spent = dispatch.PROBE_BUDGET_S
    capsys.readouterr()
    assert dispatch.row_kernel(why(), CPU_AVX512, rows_for(), "layer_norm", True) == "xla"
    assert len(probes) == 1 and capsys.readouterr().out == ""
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    monkeypatch.setattr(dispatch, "LOCK_WAIT_S", 0.2)
    with open(tmp_path / "dispatch-test.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        dispatch.state.timings.update(dispatch.cached_timings(tmp_path / "dispatch-test.json"))
        assert dispatch.row_kernel(why(), CPU_AVX512, rows_for(), "layer_norm", True) == "xla"
        fcntl.flock(held, fcntl.LOCK_UN)
    assert len(probes) == 1 and "another process has held" in capsys.readouterr().out
