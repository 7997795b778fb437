"""Where the test suite's time goes: each test's wall time, and how much of it XLA spent
compiling, the checkpoints spent saving, waiting and restoring, and the plots spent drawing.

    .venv/bin/python benchmarks/suite_phases.py --out DIR                  # the whole suite, -n 2
    .venv/bin/python benchmarks/suite_phases.py --out DIR -- tests/test_vit.py -n 0

Arguments after ``--`` go to pytest (default: ``-q -n 2``). Every test process (the xdist
workers too) records its tests' phases; then ``suite_phases.json`` in DIR holds the machine's
meta, the sums and each test's figures, and the per-file table is printed, slowest first. Time
in the fresh processes that some tests start counts only in those tests' wall time.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PHASES = ("xla_compile", "checkpoints", "plots")
_ENV = "HW2JAX_SUITE_PHASES_DIR"
_current: list[str] = []  # the node id of the running test, if any
_seconds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_replaced: list[tuple[object, str, object]] = []  # (owner, name, original), to put back


def _timed(owner, name: str, phase: str) -> None:
    """Replaces ``owner.name`` with a wrapper that adds its wall time to the running test's
    ``phase``; an outer call of the same phase counts once (a save inside a wait)."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        if not _current or _seconds[_current[0]].get(f"_in_{phase}"):
            return inner(*args, **kwargs)
        test = _seconds[_current[0]]
        test[f"_in_{phase}"] = 1
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            test[phase] += time.perf_counter() - start
            del test[f"_in_{phase}"]

    _replaced.append((owner, name, inner))
    setattr(owner, name, wrapper)


def pytest_configure(config):
    from jax._src import compiler

    from hw2jax.train import checkpoints, plots

    _timed(compiler, "backend_compile_and_load", "xla_compile")
    for name in ("save_latest", "save_best", "wait", "restore_latest", "restore_best_params"):
        _timed(checkpoints.Checkpoints, name, "checkpoints")
    for name in ("plot_history", "plot_comparison", "plot_confusion", "plot_predictions"):
        _timed(plots, name, "plots")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[:] = [item.nodeid]
    start = time.perf_counter()
    yield
    _seconds[item.nodeid]["wall"] += time.perf_counter() - start
    _current.clear()


def pytest_unconfigure(config):
    while _replaced:  # a run inside another process's tests leaves it as it was
        owner, name, inner = _replaced.pop()
        setattr(owner, name, inner)
    folder = os.environ.get(_ENV)
    if folder:
        path = Path(folder) / f"phases-{os.getpid()}.json"
        path.write_text(json.dumps({test: dict(c) for test, c in _seconds.items()}))


def summarize(per_test: dict[str, dict[str, float]]) -> dict:
    """The sums over all tests and over each test file, the files slowest first."""
    files: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for test, seconds in per_test.items():
        files[test.split("::")[0]].update(seconds)
    ordered = sorted(files.items(), key=lambda item: -item[1]["wall"])
    total = collections.Counter()
    for seconds in per_test.values():
        total.update(seconds)
    keys = ("wall", *PHASES)
    return {
        "total": {k: total[k] for k in keys},
        "files": {name: {k: c[k] for k in keys} for name, c in ordered},
    }


def table(summary: dict) -> str:
    lines = [
        "| test file | wall (s) | XLA compiling | checkpoints | plots |",
        "|---|---|---|---|---|",
    ]
    rows = [("all tests", summary["total"]), *summary["files"].items()]
    for name, s in rows:
        lines.append(
            f"| {name} | {s['wall']:.1f} | " + " | ".join(f"{s[p]:.1f}" for p in PHASES) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, pytest_args = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder for suite_phases.json")
    args = parser.parse_args(ours)
    from hw2jax.cpu import machine

    saved = {k: os.environ.get(k) for k in (_ENV, "PYTHONPATH")}
    with tempfile.TemporaryDirectory() as records:
        os.environ[_ENV] = records
        # The workers import this module by name: it must be on their path as on ours.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), saved["PYTHONPATH"]) if p)
        sys.path.insert(0, str(HERE))
        start = time.perf_counter()
        try:
            code = pytest.main([*(pytest_args or ["-q", "-n", "2"]), "-p", "suite_phases"])
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        wall = time.perf_counter() - start
        per_test: dict[str, dict[str, float]] = {}
        for path in Path(records).glob("phases-*.json"):
            per_test.update(json.loads(path.read_text()))
        _seconds.clear()
    summary = summarize(per_test)
    record = {
        "meta": machine(),
        "pytest_args": pytest_args,
        "pytest_exit": int(code),
        "wall_s": wall,
        **summary,
        "tests": per_test,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite_phases.json").write_text(json.dumps(record, indent=1))
    print(table(summary), end="")
    print(f"wrote {out / 'suite_phases.json'}")
    return record


if __name__ == "__main__":
    main()
