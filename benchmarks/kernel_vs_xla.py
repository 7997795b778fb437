"""Each fused CPU kernel against XLA's form of the same operation, in one process, timed in
turns: what a kernel build (``$HW2JAX_KERNEL_MARCH``) is worth on this CPU.

    .venv/bin/python benchmarks/kernel_vs_xla.py --out DIR
    HW2JAX_KERNEL_MARCH=x86-64-v3 .venv/bin/python benchmarks/kernel_vs_xla.py --out DIR

Operations, with gradients unless said (the paths ``implementation="auto"`` chooses between):

- softmax attention, [1, 4,096, 4, 64], causal and not: the flash kernels against XLA's
  blockwise form;
- BERT's attention with a key bias, [32, 256, 12, 32]: forward (the row kernel), also with
  the projections' biases added as it reads q, k and v, and with dropout and gradients (the
  flash kernels), against XLA's form with the same dropout hash;
- the ViT's few-keys attention, q [128, 200, 64] against kv [128, 50, 64];
- a layer norm over [8,192, 384], and forward of a post-norm residual x + (h + bias);
- BERT's GELU(x + bias) over [8,192, 1,536], forward;
- BERT's intermediate dense layer, GELU(x W + bias) for x [8,192, 384] and W [384, 1,536],
  forward: the float32 dense kernel against XLA's dot (compiled as BERT's programs are,
  without YNNPACK) and GELU;
- linear attention (elu + 1), [4, 4,096, 4, 64], causal and not: the kernels against the
  chunked form;
- the GRU's recurrence, both directions of a layer (T 128, batch 128, hidden 256): the kernel
  against ``lax.scan``.

Before timing, each pair's outputs and gradients must agree (to 2e-4 of their scale); the
median of ``--rounds`` calls each is kept, with every round's times, and ``kernel_over_xla`` is
taken round by round (``hw2jax.timing.ratio_in_turns``). ``--small`` takes every operation at a
few hundred rows (the tests run it so, with the kernels built for AVX2). Writes
``kernel_vs_xla.json`` with the build's vector features (``kernel_features``).
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np

from hw2jax import malloc
from hw2jax.cpu import machine
from hw2jax.timing import interleaved_seconds, ratio_in_turns, write_results


def _pairs(small: bool = False) -> dict[str, tuple]:
    """{operation: (kernel function, XLA function, inputs)}; each function maps the inputs to
    what is timed (outputs, or the gradients of a weighted sum of them). ``small``: a few
    hundred rows each, for a check of a build rather than a timing."""
    import jax
    import jax.numpy as jnp

    from hw2jax import attention, kernels
    from hw2jax.models import gru
    from hw2jax.models.layers import NO_YNNPACK

    rng = np.random.default_rng(0)
    t, rows = (256, 256) if small else (4096, 8192)  # sequence length; rows of the row kernels

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    pairs = {}

    def add(name, kernel, xla, inputs, gradients=True, differentiated=None, options=None):
        """Times f(*inputs), or with ``gradients`` the gradients of one fixed weighting of f's
        output (the same for both) as to the first ``differentiated`` inputs (all by
        default), with the weighted sum. ``options``: XLA's for the XLA side's program."""
        if not gradients:
            pairs[name] = (jax.jit(kernel), jax.jit(xla, compiler_options=options), inputs)
            return
        weight = jax.tree.map(lambda x: normal(*x.shape), jax.eval_shape(kernel, *inputs))
        argnums = tuple(range(differentiated or len(inputs)))

        def weighted(f, *a):
            terms = zip(jax.tree.leaves(f(*a)), jax.tree.leaves(weight), strict=True)
            return sum(jnp.sum(x * w) for x, w in terms)

        kernel, xla = (
            jax.jit(jax.value_and_grad(partial(weighted, f), argnums=argnums))
            for f in (kernel, xla)
        )
        pairs[name] = (kernel, xla, inputs)

    inputs = [normal(1, t, 4, 64) for _ in range(3)]
    for causal in (False, True):
        add(
            f"softmax attention, {'causal' if causal else 'non-causal'}",
            partial(kernels.cpu_flash_attention, causal=causal),
            partial(attention.blockwise_softmax_attention, causal=causal),
            inputs,
        )
    batch, heads = (2, 4) if small else (32, 12)
    bert = [normal(batch, 256, heads, 32) for _ in range(3)]
    key_bias = jnp.where(jnp.arange(256) < 200, 0.0, jnp.finfo(jnp.float32).min)
    key_bias = jnp.broadcast_to(key_bias, (batch, 256))  # BERT's padding mask
    add(
        "key-bias attention, forward",
        partial(attention.key_bias_attention, scale=32**-0.5, implementation="fused_cpu"),
        partial(attention.key_bias_attention, scale=32**-0.5, implementation="xla"),
        [*bert, key_bias],
        gradients=False,
    )

    def with_biases(implementation):
        def attend(q, k, v, key_bias, biases):
            return attention.key_bias_attention(
                q, k, v, key_bias, qkv_biases=biases, scale=32**-0.5, implementation=implementation
            )

        return attend

    add(
        "key-bias attention + q, k, v biases, forward",
        with_biases("fused_cpu"),
        with_biases("xla"),
        [*bert, key_bias, tuple(normal(heads, 32) for _ in range(3))],
        gradients=False,
    )
    seeds = kernels.dropout.seeds(jax.random.key(0), batch, heads)
    dropped = dict(scale=32**-0.5, dropout_rate=0.1, dropout_seeds=seeds)
    add(
        "key-bias attention with dropout",
        partial(attention.key_bias_attention, **dropped, implementation="fused_cpu"),
        partial(attention.key_bias_attention, **dropped, implementation="xla"),
        [*bert, normal(batch, 256)],
    )
    images = 8 if small else 128  # the ViT's regrouped rows
    add(
        "few-keys attention",
        partial(attention.few_keys_attention, implementation="fused_cpu"),
        partial(attention.few_keys_attention, implementation="xla"),
        [normal(images, 200, 64) * 0.125, normal(images, 50, 64)],
    )

    def xla_layer_norm(x, scale, bias):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias

    add(
        "layer norm",
        partial(kernels.cpu_layer_norm, eps=1e-6),
        xla_layer_norm,
        [normal(rows, 384), normal(384), normal(384)],
    )
    add(
        "residual + layer norm, forward",
        partial(kernels.cpu_add_layer_norm, eps=1e-6),
        lambda x, h, h_bias, scale, bias: xla_layer_norm(x + (h + h_bias), scale, bias),
        [normal(rows, 384), normal(rows, 384), normal(384), normal(384), normal(384)],
        gradients=False,
    )
    add(
        "bias + GELU, forward",
        kernels.cpu_bias_gelu,
        lambda x, b: jax.nn.gelu(x + b, approximate=False),
        [normal(rows, 1536), normal(1536)],
        gradients=False,
    )
    add(
        "dense + bias + GELU, forward",
        partial(kernels.float32_dense, gelu=True),
        partial(kernels.xla_dense, gelu=True),
        [normal(rows, 384), normal(384, 1536) * 384**-0.5, normal(1536)],
        gradients=False,
        options=dict(NO_YNNPACK),
    )
    inputs = [normal(1 if small else 4, t, 4, 64) for _ in range(3)]
    for causal in (False, True):
        add(
            f"linear attention, {'causal' if causal else 'non-causal'}",
            partial(attention.linear_attention, causal=causal, implementation="fused_cpu"),
            partial(attention.linear_attention, causal=causal, implementation="chunked"),
            inputs,
        )
    steps, batch, hidden = (16, 8, 32) if small else (128, 128, 256)
    lengths = jnp.asarray(rng.integers(steps // 2, steps + 1, batch))
    add(
        "GRU recurrence, 2 directions",
        partial(gru.recurrence, implementation="fused_cpu"),
        partial(gru.recurrence, implementation="xla"),
        [
            normal(steps, 2, batch, 3 * hidden),
            normal(2, 3 * hidden, hidden) * (0.5 * hidden**-0.5),  # a contracting recurrence
            normal(2, 3 * hidden),
            jnp.arange(steps)[None, :] < lengths[:, None],
        ],
        differentiated=3,  # not the mask
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
    parser.add_argument("--small", action="store_true", help="a few hundred rows each")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    import jax

    from hw2jax import kernels

    reason = kernels.cpu_attention_unavailable_reason(16, np.float32)
    if reason is not None:
        raise SystemExit(f"the fused kernels cannot run here: {reason}")
    results = []
    for name, (kernel, xla, inputs) in _pairs(args.small).items():
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
        row["kernel_over_xla"] = ratio_in_turns(row["kernel_s"], row["xla_s"])  # round by round
        results.append(row)
        print(
            f"{name:44s} kernel {row['kernel_ms']:8.2f} ms  XLA {row['xla_ms']:8.2f} ms"
            f"  kernel/XLA {row['kernel_over_xla']:.2f}"
        )
    meta = {
        **machine(),
        "kernel_features": kernels.kernel_vector_features(),  # its build target
        "rounds": args.rounds,
        "small": args.small,
    }
    write_results(args.out, "kernel_vs_xla.json", meta, results)


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
