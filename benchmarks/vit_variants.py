"""The ViT's training step with each attention variant, in one process: images/s and the ratio
to softmax attention, for the variant runs in ``experiments/results/vit_fashion_mnist_*``
(whose epoch times were taken on shared cores).

    .venv/bin/python benchmarks/vit_variants.py [--repeats 10] [--host-devices 2] [--out DIR]

The assignment's ViT and recipe (``experiments/vit_fashion_mnist.py``), batch 256 of random
images, data parallel over the host devices as the runs were. The variants are timed in turn,
round after round (median after warm-up, compilation apart). Writes ``vit_variants.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from hw2jax import malloc
from hw2jax.cpu import machine
from hw2jax.timing import add_host_devices, interleaved_seconds
from hw2jax.train.sharding import split_host_cpu


def train_step(attention: str, batch: int, devices: int):
    """A no-argument call that runs one training step of the ViT with ``attention``."""
    from hw2jax.config import load_config
    from hw2jax.data.fashion_mnist import ImageSplit
    from hw2jax.tasks import vit
    from hw2jax.train import steps
    from hw2jax.train.sharding import DataParallel

    config = load_config(Path(__file__).parents[1] / "experiments" / "vit_fashion_mnist.py")
    config.model.attention = attention
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    task = vit.ViTTask(config, ImageSplit(images, labels), ImageSplit(images, labels))
    parallel = DataParallel(devices, batch)
    params = task.init_params(jax.random.key(0))
    holder = {
        "state": parallel.replicate(
            steps.TrainState.create(params, steps.build_optimizer(config, 1))
        )
    }
    step = steps.make_train_step(task, jax.random.key(1))
    data = parallel.shard_batch(task.train_batches(0)[0])

    def run():
        holder["state"], sums = step(holder["state"], data)
        jax.block_until_ready(sums)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    add_host_devices(parser, "every variant's step, the batch sharded over them")
    parser.add_argument("--out", default="benchmarks/results/vit_variants")
    args = parser.parse_args(argv)
    split_host_cpu(args.host_devices)  # before any jax work
    from hw2jax.attention import registry

    batch = 256
    devices = min(args.host_devices, jax.device_count())
    kinds = registry.names(bidirectional=True)
    calls = {kind: train_step(kind, batch, devices) for kind in kinds}
    timed = interleaved_seconds(calls, args.repeats)
    base = batch / timed["softmax"][1]
    results = {
        kind: {"images_per_s": batch / median, "vs_softmax": batch / median / base, "step_s": s}
        for kind, (s, median) in timed.items()
    }
    device = jax.devices()[0]
    meta = {
        **machine(),
        "device": f"{device.platform}:{device.device_kind}",
        "devices": devices,
        "batch": batch,
        "repeats": args.repeats,
    }
    print(meta)
    for kind, r in results.items():
        print(f"{kind:10s} {r['images_per_s']:8.1f} images/s  {r['vs_softmax']:.2f}x softmax")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vit_variants.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out / 'vit_variants.json'}")


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
