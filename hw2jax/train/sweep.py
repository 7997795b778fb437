"""Several runs under one folder, each in its own work dir: a finished run is read back, an
interrupted one resumes, and a run that stops ends the sweep there, so that the same command goes
on from it. The MQAR sweep and the ViT ablation are built on this."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from hw2jax.train import run_files

Train = Callable[[ml_collections.ConfigDict, Path], dict[str, Any]]


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The history of the run in ``run_dir`` if it ran to its end, else None."""
    path = run_dir / "history.json"
    if not path.is_file():
        return None
    history = run_files.read_json(path, f"delete {run_dir} to train that run again.")
    return history if history.get("status") == "done" else None


def run_each(
    runs: Sequence[tuple[str, ml_collections.ConfigDict]], workdir: str | Path, train: Train
) -> list[dict[str, Any]]:
    """``train(config, workdir / name)`` for each (name, config) in turn, unless that run is
    done; the histories in order, fewer than ``runs`` when one stopped before its end. A run
    trained here whole records its ``wall_time_s`` (process-local: a resumed run's last part)."""
    workdir = Path(workdir)
    histories = []
    for name, config in runs:
        run_dir = workdir / name
        done = finished(run_dir)
        if done is None:
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            history = train(config, run_dir)
            if history["status"] != "done":
                break
            history["wall_time_s"] = time.perf_counter() - start
            run_files.write_json_atomic(run_dir / "history.json", history)
            done = history
        histories.append(done)
    return histories
