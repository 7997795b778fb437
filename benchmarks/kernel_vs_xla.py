"""Each fused CPU kernel against XLA's form of the same operation, in one process, timed in
turns: what a kernel build (``$HW2JAX_KERNEL_MARCH``) is worth on this CPU.

    .venv/bin/python benchmarks/kernel_vs_xla.py --out DIR
    HW2JAX_KERNEL_MARCH=x86-64-v3 .venv/bin/python benchmarks/kernel_vs_xla.py --out DIR

Operations, with gradients unless said (the paths ``implementation="auto"`` chooses between):

- softmax attention, [1, 4,096, 4, 64], causal and not: the flash kernels against XLA's
  blockwise form;
- the ViT's few-keys attention, q [128, 200, 64] against kv [128, 50, 64];
- a layer norm over [8,192, 384];
- BERT's GELU(x + bias) over [8,192, 1,536], forward;
- linear attention (elu + 1), [4, 4,096, 4, 64], causal and not: the kernels against the
  chunked form.

Before timing, each pair's outputs and gradients must agree (to 2e-4 of their scale); the
median of ``--rounds`` calls each is kept. Writes ``kernel_vs_xla.json`` with the build's
vector features (``kernel_features``).
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np

from hw2jax import malloc
from hw2jax.cpu import machine
from hw2jax.timing import interleaved_seconds, write_results


def _pairs() -> dict[str, tuple]:
    """{operation: (kernel function, XLA function, inputs)}; each function maps the inputs to
    what is timed (outputs, or the gradients of a weighted sum of them)."""
    import jax
    import jax.numpy as jnp

    from hw2jax import attention, kernels

    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    pairs = {}

    def add(name, kernel, xla, inputs, gradients=True):
        """Times f(*inputs), or with ``gradients`` the gradients of one fixed weighting of f's
        output (the same for both), with the weighted sum."""
        if not gradients:
            pairs[name] = (jax.jit(kernel), jax.jit(xla), inputs)
            return
        weight = normal(*jax.eval_shape(kernel, *inputs).shape)
        argnums = tuple(range(len(inputs)))
        kernel, xla = (
            jax.jit(jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) * weight), argnums=argnums))
            for f in (kernel, xla)
        )
        pairs[name] = (kernel, xla, inputs)

    inputs = [normal(1, 4096, 4, 64) for _ in range(3)]
    for causal in (False, True):
        add(
            f"softmax attention, {'causal' if causal else 'non-causal'}",
            partial(kernels.cpu_flash_attention, causal=causal),
            partial(attention.blockwise_softmax_attention, causal=causal),
            inputs,
        )
    add(
        "few-keys attention",
        partial(attention.few_keys_attention, implementation="fused_cpu"),
        partial(attention.few_keys_attention, implementation="xla"),
        [normal(128, 200, 64) * 0.125, normal(128, 50, 64)],
    )

    def xla_layer_norm(x, scale, bias):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias

    add(
        "layer norm",
        partial(kernels.cpu_layer_norm, eps=1e-6),
        xla_layer_norm,
        [normal(8192, 384), normal(384), normal(384)],
    )
    add(
        "bias + GELU, forward",
        kernels.cpu_bias_gelu,
        lambda x, b: jax.nn.gelu(x + b, approximate=False),
        [normal(8192, 1536), normal(1536)],
        gradients=False,
    )
    inputs = [normal(4, 4096, 4, 64) for _ in range(3)]
    for causal in (False, True):
        add(
            f"linear attention, {'causal' if causal else 'non-causal'}",
            partial(attention.linear_attention, causal=causal, implementation="fused_cpu"),
            partial(attention.linear_attention, causal=causal, implementation="chunked"),
            inputs,
        )
    return pairs


def _disagreement(a, b) -> float:
    import jax

    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
    return worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    import jax

    from hw2jax import kernels

    reason = kernels.cpu_attention_unavailable_reason(16, np.float32)
    if reason is not None:
        raise SystemExit(f"the fused kernels cannot run here: {reason}")
    results = []
    for name, (kernel, xla, inputs) in _pairs().items():
        off = _disagreement(kernel(*inputs), xla(*inputs))
        if off > 2e-4:
            raise SystemExit(f"{name}: the kernel and XLA's form differ by {off:.1e} of scale")
        timed = interleaved_seconds(
            {
                "kernel": lambda f=kernel, a=inputs: jax.block_until_ready(f(*a)),
                "xla": lambda f=xla, a=inputs: jax.block_until_ready(f(*a)),
            },
            args.rounds,
        )
        row = {"operation": name, "disagreement": off}
        row |= {f"{path}_ms": 1e3 * median for path, (_, median) in timed.items()}
        row |= {f"{path}_s": seconds for path, (seconds, _) in timed.items()}
        row["kernel_over_xla"] = row["kernel_ms"] / row["xla_ms"]
        results.append(row)
        print(
            f"{name:34s} kernel {row['kernel_ms']:8.2f} ms  XLA {row['xla_ms']:8.2f} ms"
            f"  kernel/XLA {row['kernel_over_xla']:.2f}"
        )
    meta = {
        **machine(),
        "kernel_features": kernels.kernel_vector_features(),  # its build target
        "rounds": args.rounds,
    }
    write_results(args.out, "kernel_vs_xla.json", meta, results)


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
