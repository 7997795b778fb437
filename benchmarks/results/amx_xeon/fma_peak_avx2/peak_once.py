"""Prints three runs of the measured FMA peak of this process's kernel build, as one JSON line.

.venv/bin/python peak_once.py LABEL
"""

import json
import sys

from hw2jax.kernels import build, peak

runs = [round(peak.fma_peak_gflops(), 1) for _ in range(3)]
print(json.dumps({"label": sys.argv[1], "march": build.build_march(), "gflops": runs}))
