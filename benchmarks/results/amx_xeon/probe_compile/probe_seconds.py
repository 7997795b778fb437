"""Runs a benchmark script with auto's probe budget lifted and writes each shape class it timed
with the seconds its timing took (a class timed inside another counts in both), and the
process's total:

    .venv/bin/python probe_seconds.py OUT.json benchmarks/train_throughput.py --quick --out DIR
"""

import atexit
import json
import runpy
import sys
import time

from hw2jax.attention import dispatch

dispatch.PROBE_BUDGET_S = 1e9  # time every class, to see what the whole probe costs
timed = []
time_class = dispatch.time_class


def timed_class(path, key, *args, **kwargs):
    start = time.perf_counter()
    choice = time_class(path, key, *args, **kwargs)
    timed.append((key, round(time.perf_counter() - start, 3)))
    return choice


def write():
    print("SPENT", round(dispatch.state.seconds_spent, 2), "classes", len(timed), flush=True)
    record = {"seconds_spent": dispatch.state.seconds_spent, "classes": timed}
    with open(out, "w") as f:
        json.dump(record, f, indent=1)


dispatch.time_class = timed_class
out, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
atexit.register(write)
runpy.run_path(script, run_name="__main__")
