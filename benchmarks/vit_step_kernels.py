"""The float32 ViT training step with each of its fused CPU kernels turned off and on, one
compiled step per setting in one process, timed in turns (so the machine's drift falls on all
alike), on one device and on 2 host devices (one process each):

    .venv/bin/python benchmarks/vit_step_kernels.py [--rounds 8] [--out DIR]

Settings: XLA only (``HW2JAX_ATTENTION=xla HW2JAX_ROW_KERNELS=xla``), the few-keys attention
kernel alone, the layer-norm kernel alone, and both (the default where they pay). The
assignment's ViT and recipe, batch 256 of random images; per round 5 steps a setting
(``hw2jax.timing.interleaved_seconds``), the median round gives images/s. Writes
``vit_step_kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from hw2jax import malloc
from hw2jax.cpu import machine
from hw2jax.timing import (
    interleaved_seconds,
    json_from_fresh_process,
    write_results,
)

SETTINGS = {
    "XLA only": {"HW2JAX_ATTENTION": "xla", "HW2JAX_ROW_KERNELS": "xla"},
    "few-keys attention kernel": {"HW2JAX_ROW_KERNELS": "xla"},
    "layer-norm kernel": {"HW2JAX_ATTENTION": "xla"},
    "both (default)": {},
}
STEPS = 5


def _child(devices: int, rounds: int) -> None:
    from hw2jax.train.sharding import split_host_cpu

    split_host_cpu(devices)  # before any jax work
    sys.path.insert(0, str(Path(__file__).parent))
    from vit_variants import train_step

    steps = {}
    for name, env in SETTINGS.items():
        for key in ("HW2JAX_ATTENTION", "HW2JAX_ROW_KERNELS"):
            os.environ.pop(key, None)
        os.environ.update(env)
        step = train_step("softmax", 256, devices)
        for _ in range(3):  # the first traces and compiles under this setting's variables
            step()
        steps[name] = lambda step=step: [step() for _ in range(STEPS)]
    timed = interleaved_seconds(steps, rounds)
    rates = {name: [STEPS * 256 / t for t in times] for name, (times, _) in timed.items()}
    print(json.dumps({"devices": devices, "images_per_s": rates}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/vit_step_kernels")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.rounds)
    results = []
    for devices in (1, 2):
        run = json_from_fresh_process(
            __file__, ["--child", str(devices), "--rounds", str(args.rounds)]
        )
        median = {name: float(np.median(r)) for name, r in run["images_per_s"].items()}
        run["median"] = median
        run["speedup_over_xla"] = {name: m / median["XLA only"] for name, m in median.items()}
        results.append(run)
        for name, m in median.items():
            print(
                f"{devices} device(s)  {name:28s} {m:7.1f} images/s  "
                f"{run['speedup_over_xla'][name]:.2f}x"
            )
    meta = {**machine(), "settings": SETTINGS, "steps_per_round": STEPS, "rounds": args.rounds}
    write_results(args.out, "vit_step_kernels.json", meta, results)


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
