"""Runs a benchmark script with auto's probe budget lifted and prints where the probe's time
went: compilation (summed over the threads that compile, and as the wall clock saw it), the
timed runs, and the outermost classes' whole timing (tracing and inputs included):

    .venv/bin/python probe_phases.py benchmarks/train_throughput.py --quick --only finetune
"""

import atexit
import concurrent.futures
import runpy
import sys
import time

import jax

from hw2jax.attention import dispatch

dispatch.PROBE_BUDGET_S = 1e9
seconds = {}
depth = [0]


def add(phase, start):
    seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def wrap(owner, name, phase, outermost=False):
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        depth[0] += 1
        try:
            return inner(*args, **kwargs)
        finally:
            depth[0] -= 1
            if not outermost or depth[0] == 0:
                add(phase, start)

    setattr(owner, name, timed)


class TimedPool(concurrent.futures.ThreadPoolExecutor):
    def map(self, fn, *iterables, **kwargs):
        start = time.perf_counter()
        results = list(super().map(fn, *iterables, **kwargs))
        add("compile wall", start)
        return iter(results)


wrap(jax.stages.Lowered, "compile", "compile (thread sum)")
wrap(dispatch, "best_time", "runs")
wrap(dispatch, "time_paths", "time_paths (outer)", outermost=True)
dispatch.concurrent.futures.ThreadPoolExecutor = TimedPool


def report():
    print("PHASES", {k: round(v, 2) for k, v in seconds.items()}, flush=True)


script = sys.argv[1]
sys.argv = sys.argv[1:]
atexit.register(report)
runpy.run_path(script, run_name="__main__")
