"""bf16 dense products on the CPU: the AMX kernel (hw2jax.kernels.amx_matmul), XLA's dot as a
dense layer computes it otherwise, and torch's bf16 matmul (oneDNN), forward and with gradients;
then the fused forward kernels on MiniLM's shapes: the intermediate layer with its GELU
(amx_dense on bf16 weights), a q, k or v projection from float32 weights with its bias, bf16 out
(amx_dense, against the product kernel on XLA's bf16 copy of the weights with XLA's bias and
cast, the path bf16 BERT took before, and torch's linear under autocast), and the attention
(amx_attention, against the float32 row kernel on q, k, v upcast, the path bf16 BERT took
before, and torch's bf16 scaled_dot_product_attention).

    .venv/bin/python benchmarks/bf16_matmul.py [--repeats 10] [--rows all|dense|fused]
        [--out benchmarks/results/amx_matmul]

Shapes: the dense layers of MiniLM (32 x 256 tokens, hidden 384, intermediate 1,536) and of the
ViT (256 images x 50 tokens, dim 64, MLP 128), [tokens, in] x [in, out], inputs random bf16,
float32 out. "with gradients" is the product and both of its input gradients (a loss
sum(c * g) for a fixed g). The three are timed in turn, round after round, in one process
(median after warm-up; compilation excluded); each turn times the last of --untimed-before + 1
calls in a row, as a product runs among a program's others (default 2: a single call of a few
milliseconds after torch's is slowed by torch's spinning threads, benchmarks/NOTES.md). Writes
``bf16_matmul.json``. Needs a CPU with AMX-BF16, or for ``--rows dense`` AVX512-BF16 (the kernel
then runs on pair dot products).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import kernels, malloc
from hw2jax.cpu import machine
from hw2jax.timing import interleaved_seconds, write_results

SHAPES = {
    "MiniLM q/k/v/out": (8192, 384, 384),
    "MiniLM intermediate": (8192, 384, 1536),
    "MiniLM output": (8192, 1536, 384),
    "ViT MLP in": (12800, 64, 128),
    "ViT MLP out": (12800, 128, 64),
}


def xla_product(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def product_call(product, g, gradient: bool, compiler_options: dict | None = None):
    """``product(a, b)`` jit-compiled, or with ``gradient`` the product and both input gradients
    for the cotangent g: a layer's three products, as torch's side runs them (from the
    gradients alone XLA would drop the forward product, whose value neither needs)."""
    if not gradient:
        return jax.jit(product, compiler_options=compiler_options)

    def product_and_gradients(a, b):
        out, vjp = jax.vjp(product, a, b)
        return out, *vjp(g.astype(out.dtype))

    return jax.jit(product_and_gradients, compiler_options=compiler_options)


def torch_product_call(ta, tb, tg, gradient: bool):
    """torch's ``ta @ tb`` as a call, or with ``gradient`` its backward for the cotangent tg."""
    import torch

    def run():
        if not gradient:
            with torch.no_grad():
                return ta @ tb
        x, w = ta.detach().requires_grad_(), tb.detach().requires_grad_()
        (x @ w).backward(tg)
        return x.grad

    return run


def add_untimed_before(parser) -> None:
    """The option both product benchmarks take: how many calls run untimed before each timed
    one (a call right after torch's is slowed by its spinning threads)."""
    parser.add_argument(
        "--untimed-before",
        type=int,
        default=2,
        metavar="N",
        help="calls run untimed before each timed one (0: each turn is one call)",
    )


def timed_product_row(
    calls: dict, m: int, k: int, n: int, gradient: bool, repeats: int, untimed_before: int = 0
) -> dict:
    """``calls`` (name: a call of the [m, k] x [k, n] product, or with gradient of the product
    and both input gradients) timed in turn: the row's milliseconds and GFLOP/s per name."""
    timed = interleaved_seconds(calls, repeats, untimed_before)
    ms = {name: 1e3 * median for name, (_, median) in timed.items()}
    flops = 2 * m * k * n * (3 if gradient else 1)
    return {
        "shape": [m, k, n],
        "pass": "fwd+bwd" if gradient else "fwd",
        "ms": ms,
        "gflop_s": {name: flops / t / 1e6 for name, t in ms.items()},
    }


def time_shape(m: int, k: int, n: int, gradient: bool, repeats: int, untimed_before: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    ta = torch.from_numpy(np.array(a.astype(jnp.float32))).bfloat16()
    tb = torch.from_numpy(np.array(b.astype(jnp.float32))).bfloat16()
    tg = torch.from_numpy(np.array(g)).bfloat16()

    amx, xla = (product_call(p, g, gradient) for p in (kernels.amx_matmul, xla_product))
    pairs = [
        (np.asarray(x, np.float32), np.asarray(y, np.float32))
        for x, y in zip(jax.tree.leaves(amx(a, b)), jax.tree.leaves(xla(a, b)), strict=True)
    ]
    error = max(float(np.abs(x - y).max()) for x, y in pairs)
    # Each result against its own largest value: weight gradients sum thousands of terms.
    relative = max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in pairs)
    calls = {
        "amx kernel": lambda: jax.block_until_ready(amx(a, b)),
        "xla": lambda: jax.block_until_ready(xla(a, b)),
        "torch": torch_product_call(ta, tb, tg, gradient),
    }
    row = timed_product_row(calls, m, k, n, gradient, repeats, untimed_before)
    return {**row, "max_abs_diff_vs_xla": error, "max_rel_diff_vs_xla": relative}


def time_fused(repeats: int, untimed_before: int) -> list[dict]:
    """MiniLM's intermediate layer + GELU, a projection with its bias from float32 weights and
    its attention (32 x 256 tokens, 12 heads of 32, a fifth of the keys masked), forward, bf16
    in: hw2jax's fused kernel, the unfused path, and torch."""
    import torch

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8192, 384)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((384, 1536)) * 0.05, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(1536), jnp.float32)
    tx, tw, tbias = (torch.from_numpy(np.array(t, np.float32)).bfloat16() for t in (x, w, bias))

    def dense_gelu(x, w, bias):
        return kernels.amx_dense(x, w, bias, gelu=True, out_dtype=jnp.bfloat16)

    def unfused_gelu(x, w, bias):
        return jax.nn.gelu(xla_product(x, w) + bias, approximate=False).astype(jnp.bfloat16)

    qkv = [jnp.asarray(rng.standard_normal((32, 256, 12, 32)), jnp.bfloat16) for _ in range(3)]
    masked = rng.random((32, 256)) < 0.2
    key_bias = jnp.where(masked, jnp.finfo(jnp.float32).min, 0.0)
    tq, tk, tv = (torch.from_numpy(np.array(t, np.float32)).bfloat16().transpose(1, 2) for t in qkv)
    tmask = torch.from_numpy(np.array(key_bias)).bfloat16()[:, None, None, :]

    def upcast(q, k, v, key_bias):
        return kernels.cpu_attention(*(t.astype(jnp.float32) for t in (q, k, v)), key_bias)

    w32 = jnp.asarray(rng.standard_normal((384, 384)) * 0.05, jnp.float32)
    b32 = bias[:384]
    tw32, tb32 = (torch.from_numpy(np.array(t)) for t in (w32, b32))

    def projection(x, w, bias):
        return kernels.amx_dense(x, w, bias, out_dtype=jnp.bfloat16)

    def projection_in_steps(x, w, bias):
        return (kernels.amx_matmul(x, w.astype(jnp.bfloat16)) + bias).astype(jnp.bfloat16)

    def torch_projection():
        with torch.autocast("cpu", torch.bfloat16):
            return torch.nn.functional.linear(tx, tw32.T, tb32)

    cases = {
        "MiniLM intermediate + GELU": (
            (jax.jit(dense_gelu), jax.jit(unfused_gelu), (x, w, bias)),
            lambda: torch.nn.functional.gelu(torch.nn.functional.linear(tx, tw.T, tbias)),
        ),
        "MiniLM projection + bias": (
            (jax.jit(projection), jax.jit(projection_in_steps), (x, w32, b32)),
            torch_projection,
        ),
        "MiniLM attention": (
            (jax.jit(kernels.amx_attention), jax.jit(upcast), (*qkv, key_bias)),
            lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, tmask),
        ),
    }
    rows = []
    for name, ((fused, unfused, args), theirs) in cases.items():
        error = float(
            np.abs(
                np.asarray(fused(*args), np.float32) - np.asarray(unfused(*args), np.float32)
            ).max()
        )
        with torch.no_grad():
            timed = interleaved_seconds(
                {
                    "fused kernel": lambda f=fused, a=args: jax.block_until_ready(f(*a)),
                    "unfused": lambda f=unfused, a=args: jax.block_until_ready(f(*a)),
                    "torch": theirs,
                },
                repeats,
                untimed_before,
            )
        ms = {k: 1e3 * median for k, (_, median) in timed.items()}
        rows.append({"layer": name, "pass": "fwd", "ms": ms, "max_abs_diff_vs_unfused": error})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", choices=["all", "dense", "fused"], default="all")
    add_untimed_before(parser)
    parser.add_argument("--out", default="benchmarks/results/amx_matmul")
    args = parser.parse_args(argv)
    reason = kernels.bf16_products_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the bf16 product kernel cannot run here: {reason}")
    if args.rows != "dense" and (reason := kernels.amx_matmul_unavailable_reason()) is not None:
        raise SystemExit(f"the fused rows need AMX's tiles ({reason}); pass --rows dense")
    import torch

    meta = {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "untimed_before": args.untimed_before,
        "kernel_features": kernels.kernel_vector_features(),
        "engine": kernels.bf16_products_engine(),  # what "amx kernel" ran on
    }
    print(meta)
    print(
        f"{'layer':22s} {'pass':8s} {'amx':>8s} {'xla':>8s} {'torch':>8s}  (ms)  amx/xla  amx/torch"
    )
    rows = []
    for name, (m, k, n) in SHAPES.items() if args.rows != "fused" else ():
        for gradient in (False, True):
            row = {
                "layer": name,
                **time_shape(m, k, n, gradient, args.repeats, args.untimed_before),
            }
            rows.append(row)
            ms = row["ms"]
            print(
                f"{name:22s} {row['pass']:8s} {ms['amx kernel']:8.2f} {ms['xla']:8.2f} "
                f"{ms['torch']:8.2f}  {ms['xla'] / ms['amx kernel']:6.2f}x  "
                f"{ms['torch'] / ms['amx kernel']:6.2f}x",
                flush=True,
            )
    if args.rows != "dense":
        print(f"\n{'fused forward':26s} {'fused':>8s} {'unfused':>8s} {'torch':>8s}  (ms)")
        for row in time_fused(args.repeats, args.untimed_before):
            rows.append(row)
            ms = row["ms"]
            print(
                f"{row['layer']:26s} {ms['fused kernel']:8.2f} {ms['unfused']:8.2f} "
                f"{ms['torch']:8.2f}",
                flush=True,
            )
    write_results(args.out, "bf16_matmul.json", meta, rows)


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
