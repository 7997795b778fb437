"""One BERT layer's attention as fine-tuning runs it, forward and backward: a padding mask as a
key bias and dropout on the probabilities, with gradients of q, k and v.

    .venv/bin/python benchmarks/bert_attention_training.py [--repeats 10] [--out DIR]

Shapes: MiniLM-L6's, [batch 16, T 256, heads 12, head dim 32] float32 (``--shape`` for
others); each sequence keeps a random 128 to 256 keys. Rows, timed in turn, round after round,
in one process (median after warm-up; compilation excluded):

- ``fused kernels``: the flash kernels with the key bias and the hash dropout
  (``key_bias_attention(implementation="fused_cpu")``);
- ``xla``: XLA's form with the same hash dropout (``implementation="xla"``): the same masks,
  so its outputs and gradients are compared with the kernels';
- ``xla, jax.random dropout``: XLA's form with ``jax.random.bernoulli`` masks, as ``BertModel``
  dropped probabilities before the hash (flax's ``nn.Dropout``);
- ``torch sdpa``: ``scaled_dot_product_attention`` with the bias as ``attn_mask`` and
  ``dropout_p``.

Each computes the output and the gradients of its sum (``dispatch.probe_program``). Writes
``bert_attention_training.json``.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import kernels, malloc
from hw2jax.attention import dispatch, key_bias_attention
from hw2jax.cpu import machine
from hw2jax.kernels import dropout
from hw2jax.models import bert
from hw2jax.timing import interleaved_seconds, write_results

RATE = 0.1


def _bernoulli_form(q, k, v, key_bias, rng, scale):
    """XLA's form with flax's dropout: jax.random.bernoulli keep masks."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q * scale, k, v))
    probs = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) + key_bias[:, None, None, :], axis=-1)
    keep = jax.random.bernoulli(rng, 1.0 - RATE, probs.shape)
    probs = jax.lax.select(keep, probs / (1.0 - RATE), jnp.zeros_like(probs))
    return jnp.swapaxes(probs @ v, 1, 2)


def time_layer(shape: tuple[int, int, int, int], repeats: int) -> dict:
    import torch

    batch, t, heads, head_dim = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    lengths = rng.integers(t // 2, t + 1, batch)
    key_bias = np.where(np.arange(t) < lengths[:, None], 0.0, np.finfo(np.float32).min)
    key_bias = key_bias.astype(np.float32)
    seeds = dropout.seeds(jax.random.key(0), batch, heads)
    scale = 1.0 / math.sqrt(head_dim)

    def ours(implementation):
        def attend(q, k, v):
            return key_bias_attention(
                q,
                k,
                v,
                key_bias,
                scale=scale,
                dropout_rate=RATE,
                dropout_seeds=seeds,
                implementation=implementation,
            )

        return attend

    options = bert.xla_compiler_options(None)
    step = {
        name: jax.jit(dispatch.probe_program(fn, True, operands=3), compiler_options=options)
        for name, fn in (
            ("fused kernels", ours("fused_cpu")),
            ("xla", ours("xla")),
            (
                "xla, jax.random dropout",
                lambda q, k, v: _bernoulli_form(q, k, v, key_bias, jax.random.key(1), scale),
            ),
        )
    }
    got, want = step["fused kernels"](q, k, v), step["xla"](q, k, v)
    error = max(  # relative to each result's largest value: the summed output is in thousands
        float(jnp.abs(a - b).max() / jnp.abs(b).max())
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )
    if not error < 1e-4:  # the same masks: they must agree before either is timed
        raise SystemExit(f"the fused kernels and XLA's form differ by {error:.2e} (relative)")
    tq, tk, tv = (
        torch.from_numpy(a.transpose(0, 2, 1, 3).copy()).requires_grad_() for a in (q, k, v)
    )
    mask = torch.from_numpy(key_bias[:, None, None, :])

    def run_torch():
        out = torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=mask, dropout_p=RATE
        )
        out.sum().backward()
        for x in (tq, tk, tv):
            x.grad = None

    calls = {name: (lambda f=f: jax.block_until_ready(f(q, k, v))) for name, f in step.items()}
    timed = interleaved_seconds({**calls, "torch sdpa": run_torch}, repeats)
    return {
        "shape": list(shape),
        "dropout": RATE,
        "ms": {name: 1e3 * median for name, (_, median) in timed.items()},
        "max_rel_diff_fused_vs_xla": error,  # the output's sum and each gradient, same masks
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=4, default=(16, 256, 12, 32))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    reason = kernels.cpu_attention_unavailable_reason(args.shape[-1], np.float32)
    if reason is not None:
        raise SystemExit(f"the fused kernels cannot run here: {reason}")
    import torch

    row = time_layer(tuple(args.shape), args.repeats)
    meta = {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "kernel_features": kernels.kernel_vector_features(),
    }
    print(meta)
    ms = row["ms"]
    for name, value in ms.items():
        ratio = value / ms["fused kernels"]
        print(f"{name:26s} {value:8.1f} ms   {ratio:.2f}x the fused kernels' time")
    print(
        "fused against xla, the output's sum and each gradient: "
        f"{row['max_rel_diff_fused_vs_xla']:.1e} of the largest value"
    )
    write_results(args.out, "bert_attention_training.json", meta, [row])


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
