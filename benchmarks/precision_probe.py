"""What ``encoder_dtype=auto`` times on this machine, in a fresh cache: one MiniLM layer at
16 x 256 tokens in float32 and in bf16, forward, with gradients, and with gradients and dropout
(each as a run of that kind would time it; a run times only its own), and which dtype it takes.

    .venv/bin/python benchmarks/precision_probe.py [--out DIR]

Each kind gets the whole probe budget of a run (a run times one kind), so a slow CPU's third
kind is timed too. Writes ``precision_probe.json`` in DIR: the machine, each kind's choice and
milliseconds per dtype, and every class timed on the way (the layer's attention, layer-norm and
dense classes, which a run of that shape times anyway).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ["HW2JAX_AUTO"] = "measure"  # the probe is what this measures, whatever the shell says

from hw2jax import malloc
from hw2jax.attention import dispatch
from hw2jax.cpu import machine
from hw2jax.models import bert
from hw2jax.timing import write_results

KINDS = (("forward", False, False), ("with gradients", True, False))
KINDS += (("with gradients and dropout", True, True),)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/precision_probe")
    args = parser.parse_args(argv)
    cache = Path(tempfile.mkdtemp()) / "dispatch.json"
    dispatch.cache_file = lambda: cache  # a fresh cache: every class timed here, now
    config = bert.BertConfig.from_json(bert.resolve_encoder("minilm") / "config.json")
    meta = {**machine(), "kernel_features": dict(dispatch.this_machine().kernel_features)}
    meta["layer"] = "MiniLM-L6 layer, 16 x 256 tokens"
    print(meta)
    rows = []
    for kind, gradient, dropout in KINDS:
        dispatch.restart_budget()  # a run times one kind: each gets a run's budget
        start = time.perf_counter()
        choice, ms = dispatch.precision(
            "bfloat16", lambda d=dropout: bert.precision_paths(config, 16, 256, d), gradient
        )
        seconds = time.perf_counter() - start
        rows.append({"kind": kind, "choice": choice, "ms": ms, "probe_s": seconds})
        print(f"{kind}: {choice}; {ms} ms; {seconds:.1f} s for this class and the layer's own")
    timed = {key: c["ms"] for key, c in dispatch.state.timings.items()}
    return write_results(args.out, "precision_probe.json", {**meta, "classes": timed}, rows)


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
