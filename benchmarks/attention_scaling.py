r"""Softmax vs linear attention as T grows: time, compile time and compiled memory.

    .venv/bin/python benchmarks/attention_scaling.py --quick          # < 2 min on 2 CPU cores
    .venv/bin/python benchmarks/attention_scaling.py --out benchmarks/results

Every point is the median of N timed calls after a warm-up, with ``block_until_ready``;
compilation is timed apart. The implementations of one point run on the same inputs and are
timed in turns, round after round, so that a slow patch of a shared machine slows every
contender of the point alike; each record keeps its N times (``times_ms``), in round order,
and names the implementations timed with it (``timed_with``). A point over the time or memory
budget is recorded as skipped with its reason and the sweep goes on. Peers (torch SDPA and a
torch linear attention in the fast-transformers formulation) run in the same process when
torch is installed, so ratios compare like with like; ``--fla-wheels DIR`` adds fla's Triton
chunk kernel on a GPU. Writes ``attention_scaling_<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hw2jax import attention, kernels, malloc
from hw2jax.attention import dispatch, registry
from hw2jax.cpu import machine
from hw2jax.testing.torch_peer import torch_peer_device, torch_synchronize
from hw2jax.timing import add_host_devices, interleaved_seconds
from hw2jax.train.sharding import split_host_cpu


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "jax" or "torch"
    family: str  # "softmax", "linear", or a variant: "performer", "cosformer", "retention", "gla"
    causal: tuple[bool, ...]  # which causal settings it supports
    build: Callable  # (causal) -> fn(q, k, v)
    gpu_only: bool = False
    dtype: str | None = None  # forces a dtype (cuDNN needs bf16)
    quadratic_memory: bool = False  # materialises T x T scores
    multi_device: bool = False  # only worth timing when jax sees several devices
    cpu_only: bool = False
    forward_only: bool = False  # its backward is another implementation's (not worth timing)


def heads_over_devices(fn: Callable) -> Callable:
    """``fn`` with q, k and v sharded along the heads over every device jax sees. On a CPU
    split into host devices (``--host-devices``) each core then runs its own heads: XLA's CPU
    runtime leaves cores idle on one device. The heads must divide evenly."""

    def sharded(q, k, v):
        mesh = Mesh(np.array(jax.devices()), ("heads",))
        spec = NamedSharding(mesh, PartitionSpec(None, None, "heads", None))
        return fn(*(jax.lax.with_sharding_constraint(a, spec) for a in (q, k, v)))

    return sharded


def _jax_impls() -> list[Impl]:
    def softmax(impl):
        return lambda causal: (
            lambda q, k, v: attention.softmax_attention(q, k, v, causal=causal, implementation=impl)
        )

    def xla(implementation):
        return lambda causal: (
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, implementation=implementation
            )
        )

    def linear(implementation):
        return lambda causal: (
            lambda q, k, v: attention.linear_attention(
                q, k, v, causal=causal, implementation=implementation
            )
        )

    both = (False, True)
    return [
        Impl(
            "hw2jax softmax (naive)",
            "jax",
            "softmax",
            both,
            softmax("naive"),
            quadratic_memory=True,
        ),
        Impl("hw2jax softmax (blockwise)", "jax", "softmax", both, softmax("blockwise")),
        # What softmax_attention picks by itself, and JAX's Pallas flash kernel (Triton; off a
        # GPU it would run in interpret mode: a check, not a contender).
        Impl("hw2jax softmax (auto)", "jax", "softmax", both, softmax("auto")),
        Impl("hw2jax softmax (pallas)", "jax", "softmax", both, softmax("pallas"), gpu_only=True),
        Impl(
            "hw2jax softmax (blockwise, heads over devices)",
            "jax",
            "softmax",
            both,
            lambda causal: heads_over_devices(softmax("blockwise")(causal)),
            multi_device=True,
        ),
        Impl(
            "jax.nn.dot_product_attention (xla)",
            "jax",
            "softmax",
            both,
            xla("xla"),
            quadratic_memory=True,
        ),
        # BERT's default on CPU: non-causal, float32, head dims 16..128; gradients via XLA.
        Impl(
            "hw2jax fused CPU kernel",
            "jax",
            "softmax",
            (False,),
            lambda causal: lambda q, k, v: kernels.cpu_attention(q, k, v),
            cpu_only=True,
            forward_only=True,
            dtype="float32",
        ),
        # softmax_attention's fused CPU kernels, forward and backward (the flash kernel).
        Impl(
            "hw2jax softmax (fused CPU)",
            "jax",
            "softmax",
            both,
            softmax("fused_cpu"),
            cpu_only=True,
            dtype="float32",
        ),
        Impl(
            "jax.nn.dot_product_attention (cudnn)",
            "jax",
            "softmax",
            both,
            xla("cudnn"),
            gpu_only=True,
            dtype="bfloat16",
        ),
        Impl("hw2jax linear", "jax", "linear", (False,), linear("chunked")),
        Impl("hw2jax linear (causal chunked)", "jax", "linear", (True,), linear("chunked")),
        Impl("hw2jax linear (causal recurrent)", "jax", "linear", (True,), linear("recurrent")),
        Impl(
            "hw2jax linear (fused CPU)",
            "jax",
            "linear",
            (False,),
            linear("fused_cpu"),
            cpu_only=True,
            dtype="float32",
        ),
        Impl(
            "hw2jax linear (causal fused CPU)",
            "jax",
            "linear",
            (True,),
            linear("fused_cpu"),
            cpu_only=True,
            dtype="float32",
        ),
        # Based's Taylor map by its features (1 + d + d^2 per head), whatever auto would take:
        # the baseline for the "based" row's parallel form, which auto takes below that many keys.
        Impl(
            "hw2jax based (Taylor features, chunked)",
            "jax",
            "based",
            both,
            lambda causal: (
                lambda q, k, v: attention.linear_attention(
                    q, k, v, causal=causal, feature_map="taylor", implementation="chunked"
                )
            ),
        ),
        # Off a GPU the Pallas kernel runs in interpret mode: a check, not a contender.
        Impl(
            "hw2jax linear (causal pallas)",
            "jax",
            "linear",
            (True,),
            linear("pallas"),
            gpu_only=True,
        ),
    ]


def _registered_variants() -> list[Impl]:
    """A row per registered attention variant beyond softmax and linear (whose paths have rows
    of their own), in each form it has, with its default options; gates, where a variant asks
    for them, are made from the keys (data-dependent, as a model's would be)."""

    made = {  # each gate from the keys, in the shape registry.GATES gives it
        "log_alpha": lambda k: jax.nn.log_sigmoid(k) / 16,
        "head_log_alpha": lambda k: jax.nn.log_sigmoid(k.mean(-1)) / 16,
        "beta": lambda k: jax.nn.sigmoid(k.mean(-1)),
    }

    def build(variant):
        def gates(k):
            return {name: made[name](k) for name in variant.gates}

        return lambda causal: lambda q, k, v: variant.bind(causal=causal)(q, k, v, **gates(k))

    rows = []
    for name in registry.names():
        if name in ("softmax", "linear"):
            continue
        variant = registry.get(name)
        forms = tuple(
            c for c, has in ((False, variant.bidirectional), (True, variant.causal)) if has
        )
        rows.append(Impl(f"hw2jax {name}", "jax", name, forms, build(variant)))
    return rows


def _torch_impls() -> list[Impl]:
    try:
        import torch
    except ImportError:
        return []

    def sdpa(causal):
        def fn(q, k, v):  # torch wants [B, H, T, D]
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )
            return out.transpose(1, 2)

        return fn

    def fast_transformers_linear(causal):
        # The non-causal formula of fast_transformers.attention.LinearAttention:
        # elu + 1 feature map, KV = K^T V once, then Q KV normalised by Q . sum(K).
        def fn(q, k, v):
            fq = torch.nn.functional.elu(q) + 1
            fk = torch.nn.functional.elu(k) + 1
            kv = torch.einsum("nshd,nshm->nhmd", fk, v)
            z = 1 / (torch.einsum("nlhd,nhd->nlh", fq, fk.sum(dim=1)) + 1e-6)
            return torch.einsum("nlhd,nhmd,nlh->nlhm", fq, kv, z)

        return fn

    def chunked_causal_linear(causal, chunk=64):
        # The chunk algorithm of our causal form in torch ops (fast-transformers' causal
        # product needs its compiled extension): exact inside chunks of 64, state between.
        def fn(q, k, v):
            b, t, h, d = q.shape
            c = min(chunk, t)
            n = t // c  # the benchmark's T are powers of two
            fq = (torch.nn.functional.elu(q) + 1).reshape(b, n, c, h, d)
            fk = (torch.nn.functional.elu(k) + 1).reshape(b, n, c, h, d)
            vv = v.reshape(b, n, c, h, v.shape[-1])
            states = torch.einsum("bnchd,bnche->bnhde", fk, vv)
            before = states.cumsum(1) - states
            sums = fk.sum(2)
            sums_before = sums.cumsum(1) - sums
            mask = torch.tril(torch.ones(c, c, dtype=torch.bool, device=q.device))
            scores = torch.einsum("bnqhd,bnkhd->bnhqk", fq, fk).masked_fill(~mask, 0.0)
            num = torch.einsum("bnqhd,bnhde->bnqhe", fq, before) + torch.einsum(
                "bnhqk,bnkhe->bnqhe", scores, vv
            )
            den = torch.einsum("bnqhd,bnhd->bnqh", fq, sums_before) + scores.sum(-1).transpose(2, 3)
            return (num / (den[..., None] + 1e-6)).reshape(b, t, h, -1)

        return fn

    return [
        Impl(
            # No T x T scores: for these inputs (no mask) torch picks its flash kernel, on a
            # CPU as on a GPU, so no memory budget applies.
            "torch sdpa",
            "torch",
            "softmax",
            (False, True),
            sdpa,
        ),
        Impl(
            "torch linear (fast-transformers)",
            "torch",
            "linear",
            (False,),
            fast_transformers_linear,
        ),
        Impl(
            "torch linear (causal chunked)",
            "torch",
            "linear",
            (True,),
            chunked_causal_linear,
        ),
    ]


def fla_chunk_linear_attn(wheels: str | None = None) -> Callable | None:
    """fla's Triton chunk kernel (flash-linear-attention, PyTorch), or None where it cannot load.
    It is not a dependency: an installed ``fla``, else the pure-Python ``fla_core-*.whl`` in
    ``wheels`` unpacked onto sys.path (einops, torch and triton come with a GPU image)."""
    if wheels:
        for wheel in sorted(Path(wheels).glob("fla_core-*.whl")):
            target = Path(tempfile.mkdtemp(prefix="fla-"))
            atexit.register(shutil.rmtree, target, True)  # imported from until the process ends
            zipfile.ZipFile(wheel).extractall(target)
            sys.path.insert(0, str(target))
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as e:  # no fla, no triton, no GPU driver: say why, time the rest
        print(f"fla not timed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return chunk_linear_attn


def fla_impls(wheels: str | None) -> list[Impl]:
    chunk_linear_attn = fla_chunk_linear_attn(wheels) if wheels is not None else None
    if chunk_linear_attn is None:
        return []
    import torch

    def build(causal):
        # Our causal linear attention, checked equal to fla's own naive reference (2e-7 at
        # T = 256): elu + 1 features applied first, no 1/sqrt(d), normalised by q . cumsum(k).
        def fn(q, k, v):
            fq, fk = (torch.nn.functional.elu(x) + 1 for x in (q, k))
            return chunk_linear_attn(fq, fk, v, scale=1.0, normalize=True)[0]

        return fn

    return [Impl("fla chunk (Triton)", "torch", "linear", (True,), build, gpu_only=True)]


def all_impls(fla_wheels: str | None = None) -> list[Impl]:
    """Every implementation; fla's kernel too when ``fla_wheels`` is given ("" for an installed
    fla)."""
    return _jax_impls() + _registered_variants() + _torch_impls() + fla_impls(fla_wheels)


def timed_pass(fn: Callable, backward: bool) -> Callable:
    """What a point times of a jax implementation: what auto's probe times
    (:func:`hw2jax.attention.dispatch.probe_program`), the forward, or the output's sum with
    the gradients of q, k and v, the output computed as torch's side computes it."""
    return dispatch.probe_program(fn, backward, operands=3)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One implementation at one point, compiled and run once: ``call`` runs it and waits."""

    call: Callable[[], object]
    compile_ms: float | None
    temp_bytes: int | None
    first_s: float  # the untimed first call's wall time


def prepare(impl: Impl, q, k, v, *, causal: bool, backward: bool) -> Prepared:
    """Compiles ``impl`` (JAX only, timed apart) on q, k and v and runs it once untimed."""
    fn = impl.build(causal)
    if impl.kind == "jax":
        f = jax.jit(timed_pass(fn, backward))
        start = time.perf_counter()
        compiled = f.lower(q, k, v).compile()
        compile_ms = 1e3 * (time.perf_counter() - start)
        memory = compiled.memory_analysis()
        temp = int(memory.temp_size_in_bytes) if memory is not None else None

        def call():
            return jax.block_until_ready(compiled(q, k, v))
    else:
        import torch

        device = torch_peer_device()
        dtype = getattr(torch, str(q.dtype))
        tq, tk, tv = (
            torch.tensor(np.asarray(a, np.float32), device=device)
            .to(dtype)
            .requires_grad_(backward)
            for a in (q, k, v)
        )
        compile_ms, temp = None, None

        def call():
            if backward:
                out = fn(tq, tk, tv).sum()
                out.backward()
            else:
                with torch.no_grad():
                    out = fn(tq, tk, tv)
            torch_synchronize(device)
            return out

    start = time.perf_counter()
    call()
    return Prepared(call, compile_ms, temp, time.perf_counter() - start)


SHORT_CALL_S = 0.05  # calls shorter than this get an untimed run before each timed one


def _point(
    members: list[Impl], t: int, *, backward, causal, dtype, too_slow, budget, shape, log
) -> list[dict]:
    """Every implementation of one (pass, mask, dtype) at one T, on the same inputs, timed in
    turns (:func:`hw2jax.timing.interleaved_seconds`): a slow patch of a shared machine then
    lands on every contender of the point alike, not on whichever curve ran during it."""
    device = jax.devices()[0]
    keys = jax.random.split(jax.random.key(t), 3)
    q, k, v = (
        jax.random.normal(key, (1, t, shape["heads"], shape["head_dim"]), jnp.dtype(dtype))
        for key in keys
    )
    score_bytes = 4 * shape["heads"] * t * t * (3 if backward else 1)
    records, ready = {}, {}
    for impl in members:
        rec = records[impl.name] = {
            "impl": impl.name,
            "family": impl.family,
            "T": t,
            "pass": "fwd+bwd" if backward else "fwd",
            "causal": causal,
            "dtype": dtype,
            "device": f"{device.platform}:{device.device_kind}",
            "median_ms": None,
            "compile_ms": None,
            "temp_bytes": None,
        }
        if impl.name in too_slow:
            rec["skipped"] = too_slow[impl.name]
        elif impl.quadratic_memory and score_bytes > budget["memory_bytes"]:
            rec["skipped"] = (
                f"T x T scores need {score_bytes / 2**30:.1f} GiB, over the "
                f"{budget['memory_bytes'] / 2**30:.0f} GiB budget"
            )
        else:
            try:
                ready[impl.name] = prepare(impl, q, k, v, causal=causal, backward=backward)
            except Exception as e:  # one bad point must not end the sweep
                rec["skipped"] = f"{type(e).__name__}: {str(e)[:200]}"
    if ready:
        # torch's threads spin for some 10 ms after their work: a short call is otherwise
        # slowed by whichever call ran before it.
        short = max(p.first_s for p in ready.values()) < SHORT_CALL_S
        timed = interleaved_seconds(
            {name: p.call for name, p in ready.items()},
            shape["repeats"],
            untimed_before=1 if short else 0,
            warm_up=False,
            min_span_s=shape["min_span_s"],
        )
        for name, p in ready.items():
            times, median = timed[name]
            records[name].update(
                median_ms=1e3 * median,
                times_ms=[round(1e3 * s, 3) for s in times],
                compile_ms=p.compile_ms,
                temp_bytes=p.temp_bytes,
                timed_with=sorted(set(ready) - {name}),
            )
            if 1e3 * median > budget["time_ms"]:
                too_slow[name] = (
                    f"T={t} took {1e3 * median:.0f} ms, over the {budget['time_ms']:.0f} ms budget"
                )
    for rec in records.values():
        shown = (
            f"{rec['median_ms']:10.2f} ms"
            if rec["median_ms"] is not None
            else f"skipped ({rec['skipped']})"
        )
        log(f"{rec['impl']:38s} {rec['pass']:7s} causal={causal!s:5s} {dtype:8s} T={t:<7d} {shown}")
    return list(records.values())


def sweep(
    lengths,
    impls,
    *,
    passes,
    causals,
    dtypes,
    heads=4,
    head_dim=64,
    repeats=5,
    time_budget_ms=20_000.0,
    memory_budget_bytes=8 * 2**30,
    min_span_s=0.0,
    log=print,
    on_point: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every supported (implementation, pass, causal, dtype) curve over ``lengths``, the
    implementations of one (pass, causal, dtype) timed in turns at each T; a curve stops at
    the first point over the time budget, in ``repeats`` rounds or more until the timed calls
    add up to ``min_span_s``. ``on_point(records so far)`` runs after each point (to save
    partial results)."""
    on_gpu = jax.devices()[0].platform == "gpu"
    budget = {"time_ms": time_budget_ms, "memory_bytes": memory_budget_bytes}
    shape = {"heads": heads, "head_dim": head_dim, "repeats": repeats, "min_span_s": min_span_s}
    groups: dict[tuple, list[Impl]] = {}
    for impl in impls:
        if (
            (impl.gpu_only and not on_gpu)
            or (impl.cpu_only and on_gpu)
            or (impl.multi_device and jax.device_count() < 2)
        ):
            continue
        for backward in (p for p in passes if not (p and impl.forward_only)):
            for causal in (c for c in causals if c in impl.causal):
                for dtype in [impl.dtype] if impl.dtype else dtypes:
                    if impl.kind == "torch" and dtype != "float32" and not on_gpu:
                        continue  # torch's CPU bf16 attention is emulated, not a peer
                    groups.setdefault((backward, causal, dtype), []).append(impl)
    records = []
    for (backward, causal, dtype), members in groups.items():
        too_slow: dict[str, str] = {}  # a curve's reason to stop, by implementation
        for t in lengths:
            records += _point(
                members,
                t,
                backward=backward,
                causal=causal,
                dtype=dtype,
                too_slow=too_slow,
                budget=budget,
                shape=shape,
                log=log,
            )
            if on_point:
                on_point(records)
    return records


def fitted_slope(records: list[dict], min_t: int = 2048) -> float | None:
    pts = [(r["T"], r["median_ms"]) for r in records if r["median_ms"] and r["T"] >= min_t]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def _series(records):
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["impl"], r["pass"], r["causal"], r["dtype"]), []).append(r)
    return groups


def crossover(
    records: list[dict], softmax: str, linear: str, pass_: str, causal: bool
) -> int | None:
    """The smallest T from which ``linear`` is faster than ``softmax`` at every measured T."""

    def get(name):
        return {
            r["T"]: r["median_ms"]
            for r in records
            if r["impl"] == name
            and r["pass"] == pass_
            and r["causal"] == causal
            and r["dtype"] == "float32"
            and r["median_ms"]
        }

    a, b = get(softmax), get(linear)
    common = sorted(set(a) & set(b))
    for i, t in enumerate(common):
        if all(b[u] < a[u] for u in common[i:]):
            return t
    return None


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["pass"], r["causal"]) for r in records})
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (pass_, causal) in zip(axes[0], panels, strict=True):
        for (name, p, c, dtype), rows in sorted(_series(records).items()):
            if (p, c) != (pass_, causal):
                continue
            rows = [r for r in rows if r["median_ms"]]
            if not rows:
                continue
            slope = fitted_slope(rows)
            label = f"{name} {dtype}" + (f" (slope {slope:.2f})" if slope is not None else "")
            style = "--" if rows[0]["family"] == "linear" else "-"
            ax.loglog(
                [r["T"] for r in rows],
                [r["median_ms"] for r in rows],
                style,
                marker="o",
                markersize=3,
                label=label,
            )
        cross = crossover(
            records,
            "hw2jax softmax (naive)",
            "hw2jax linear (causal chunked)" if causal else "hw2jax linear",
            pass_,
            causal,
        )
        if cross:
            ax.axvline(cross, color="gray", ls=":", label=f"linear faster from T={cross}")
        ax.set(
            xlabel="sequence length T",
            ylabel="median time (ms)",
            title=f"{pass_}, {'causal' if causal else 'non-causal'}",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="T up to 2^12, forward only, 3 repeats, no span: under 2 minutes on a CPU",
    )
    parser.add_argument("--min-log2", type=int, default=6)
    parser.add_argument(
        "--max-log2",
        type=int,
        default=None,
        help="largest T as a power of 2 (default 17; 20 for linear on a GPU)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--min-span-s",
        type=float,
        default=None,
        help="more rounds than --repeats (up to 5x) until a point's timed calls add up to this "
        "(default 10 s, 0 with --quick: a slow patch of a few seconds is then a minority of a "
        "point's rounds)",
    )
    parser.add_argument("--time-budget-ms", type=float, default=20_000.0)
    parser.add_argument("--memory-budget-gib", type=float, default=8.0)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--impl",
        action="append",
        default=[],
        metavar="TEXT",
        help="only the implementations whose name contains TEXT (repeatable)",
    )
    parser.add_argument(
        "--fla-wheels",
        metavar="DIR",
        help="also time fla's Triton chunk kernel (GPU only): DIR holds fla_core-*.whl, or '' "
        "for an installed fla",
    )
    add_host_devices(parser, "the 'heads over devices' row (the others run on one device)")
    args = parser.parse_args(argv)
    split_host_cpu(args.host_devices)  # before any jax work; only adds CPU devices on a GPU

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    max_log2 = args.max_log2 or (12 if args.quick else 17)
    repeats = 3 if args.quick else args.repeats
    min_span_s = args.min_span_s if args.min_span_s is not None else 0.0 if args.quick else 10.0
    lengths = [2**i for i in range(args.min_log2, max_log2 + 1)]
    passes = (False,) if args.quick else (False, True)
    dtypes = ("float32", "bfloat16") if on_gpu else ("float32",)
    impls = [
        i
        for i in all_impls(args.fla_wheels)
        if not args.impl or any(t in i.name for t in args.impl)
    ]
    tag = f"{device.platform}-{device.device_kind}".replace(" ", "_").replace("/", "_").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    meta = {
        **machine(),
        "device": f"{device.platform}:{device.device_kind}",
        "host": platform.node(),
        "jax_devices": jax.device_count(),
        "quick": args.quick,
        "repeats": repeats,
        "min_span_s": min_span_s,
        "complete": False,
        "batch": 1,
        "heads": 4,
        "head_dim": 64,
    }
    done: list[dict] = []  # records of the finished sweeps

    def save(records: list[dict]) -> dict:
        """Writes the JSON after every curve, so a sweep cut short keeps what it measured."""
        records = done + records
        meta["wall_s"] = time.perf_counter() - start
        meta["auto_timed"] = dispatch.timings()  # what softmax (auto) measured and took
        slopes = {
            f"{k[0]} | {k[1]} | causal={k[2]} | {k[3]}": fitted_slope(v)
            for k, v in _series(records).items()
        }
        tmp = out / f".attention_scaling_{tag}.json.tmp"
        tmp.write_text(
            json.dumps({"meta": meta, "slopes_T>=2048": slopes, "records": records}, indent=1)
        )
        tmp.replace(out / f"attention_scaling_{tag}.json")
        return slopes

    done += sweep(
        lengths,
        impls,
        passes=passes,
        causals=(False, True),
        dtypes=dtypes,
        repeats=repeats,
        time_budget_ms=args.time_budget_ms,
        memory_budget_bytes=int(args.memory_budget_gib * 2**30),
        min_span_s=min_span_s,
        on_point=save,
    )
    if on_gpu and not args.quick and not args.max_log2:
        # Linear attention keeps going where softmax cannot.
        longer = [2**i for i in range(max_log2 + 1, 21)]
        done += sweep(
            longer,
            [i for i in impls if i.family == "linear" and i.kind == "jax"],
            passes=passes,
            causals=(False, True),
            dtypes=dtypes,
            repeats=args.repeats,
            time_budget_ms=args.time_budget_ms,
            min_span_s=min_span_s,
            on_point=save,
        )
    meta["complete"] = True
    slopes = save([])
    records = done
    elapsed = meta["wall_s"]
    plot(
        records,
        out / f"attention_scaling_{tag}.png",
        f"attention scaling on {meta['device']} ({meta['date']}, batch 1, 4 heads x 64)",
    )
    print(f"\nwrote {out}/attention_scaling_{tag}.json and .png in {elapsed:.0f} s")
    for key, slope in slopes.items():
        if slope is not None:
            print(f"  slope over T>=2048: {slope:5.2f}  {key}")


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
