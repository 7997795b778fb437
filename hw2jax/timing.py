"""Wall-clock timing shared by `hw2jax theory` and the benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hw2jax import cpu


def add_host_devices(parser, rows: str, default: int | None = None) -> None:
    """The benchmarks' ``--host-devices N`` option: on CPU, the cores shown to jax as N devices
    for ``rows`` (what runs split over them); one per core unless ``default`` says otherwise.
    The script passes the value to :func:`hw2jax.train.sharding.split_host_cpu` before any jax
    work."""
    parser.add_argument(
        "--host-devices",
        type=int,
        default=default or cpu.usable_cores(),
        metavar="N",
        help=f"CPU only: show the cores to jax as N devices for {rows} ("
        + (
            "default: one per core; 1 splits nothing)"
            if default is None
            else f"default: {default})"
        ),
    )


def median_seconds(call: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``call()`` after one warm-up call (which also compiles under jit).
    ``call`` must wait for its work to finish, e.g. with ``block_until_ready``."""
    return interleaved_seconds({"call": call}, repeats)["call"][1]


MAX_ROUNDS_PER_REPEAT = 5  # min_span_s's cap: calls of microseconds stop at 5 x repeats


def interleaved_seconds(
    calls: dict[str, Callable[[], object]],
    repeats: int = 5,
    untimed_before: int = 0,
    warm_up: bool = True,
    min_span_s: float = 0.0,
) -> dict[str, tuple[list[float], float]]:
    """Times several calls in turn, round after round, after one warm-up call each: on a
    shared machine a slow patch then hits every contender alike instead of whichever ran
    during it. Each round starts one call later (a b, b a, a b ...), so that no call always
    runs right after the same other one (torch's spinning threads, a cache it left cold).
    With ``untimed_before``, each turn first runs its call that many times untimed: a call of
    a few milliseconds is otherwise slowed by the one before it (torch's OpenMP threads spin
    for some 10 ms after their work) or by an idle gap, as it would not be among a program's
    other ops. ``warm_up=False`` skips the warm-up calls, for calls already run once (a long
    call's warm-up is seconds). With ``min_span_s``, rounds go on past ``repeats`` until the
    timed calls add up to that many seconds, up to ``MAX_ROUNDS_PER_REPEAT * repeats`` rounds:
    a slow patch of a few seconds is then a minority of short calls' rounds, not two of three
    (a 0.89x row on the Zen 4, benchmarks/results/zen4/quick_in_turns/). Returns
    {name: (seconds of each timed call, in round order, median)}."""
    for call in calls.values() if warm_up else ():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    round_, spent = 0, 0.0
    while round_ < repeats or (spent < min_span_s and round_ < MAX_ROUNDS_PER_REPEAT * repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            call = calls[name]
            for _ in range(untimed_before):
                call()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        round_ += 1
    return {name: (t, float(np.median(t))) for name, t in times.items()}


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """``numerator[r] / denominator[r]`` for each round r of two calls' times from
    :func:`interleaved_seconds`: the r-th times of each were taken in the same round, one
    right after the other."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(
            f"times of the same rounds are needed: {len(numerator)} and {len(denominator)} given"
        )
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def ratio_in_turns(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median of :func:`round_ratios`: a slow patch over part of the rounds slows both of a
    pair, where the ratio of the two medians can set one call's slowed time against the
    other's unslowed."""
    return float(np.median(round_ratios(numerator, denominator)))


def json_from_fresh_process(
    script: str | Path, args: Sequence[str], env: dict[str, str] | None = None
) -> dict:
    """Runs ``python script *args`` in a fresh process (for what is fixed at start-up: glibc's
    malloc settings, jax's host devices) and returns the JSON object on the last line it
    prints; if it fails, a RuntimeError with the end of its stderr."""
    done = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(out_dir: str | Path, name: str, meta: dict, results: list) -> Path:
    """``{"meta": meta, "results": results}`` as ``out_dir/name``, said once written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {path}")
    return path
