"""What ``encoder_dtype=auto`` times on this machine, in a fresh cache: one MiniLM layer at
16 x 256 tokens in float32 and in bf16, forward, with gradients, and with gradients and dropout
(each as a run of that kind would time it; a run times only its own).

    .venv/bin/python benchmarks/results/amx_xeon/precision_auto/precision_probe.py
"""

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HW2JAX_AUTO", "measure")

from hw2jax import cpu
from hw2jax.attention import dispatch
from hw2jax.models import bert

cache = Path(tempfile.mkdtemp()) / "dispatch.json"
dispatch.cache_file = lambda: cache
config = bert.BertConfig.from_json(bert.resolve_encoder("minilm") / "config.json")
machine = cpu.machine()
print(machine["cpu_model"], machine["cpu_family_model"], machine["env"])
print("kernel features:", dispatch.this_machine().kernel_features)
for gradient, dropout in [(False, False), (True, False), (True, True)]:
    start = time.perf_counter()
    name, ms = dispatch.precision(
        "bfloat16", lambda d=dropout: bert.precision_paths(config, 16, 256, d), gradient
    )
    what = "with gradients" if gradient else "forward"
    print(
        f"{what}{', dropout' if dropout else ''}: {name}; {ms} ms; "
        f"{time.perf_counter() - start:.1f} s for this class and the layer's own"
    )
print(json.dumps({key: c["ms"] for key, c in dispatch.state.timings.items()}, indent=1))
