"""A run's per-epoch table in Markdown, from its ``history.json`` (``hw2jax report WORKDIR``)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def epoch_table(history: dict, unit: str = "examples") -> str:
    """One row per finished epoch: losses, the evaluated split's accuracy, time and throughput."""
    rows = history.get("epochs", [])
    if not rows:
        return "(no finished epoch)"
    split = next(k.removesuffix("_accuracy") for k in rows[0] if k.endswith("_accuracy"))
    lines = [
        f"| epoch | train loss | {split} loss | {split} accuracy | epoch time (s) | {unit}/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['epoch']} | {r['train_loss']:.4f} | {r[f'{split}_loss']:.4f} | "
            f"{100 * r[f'{split}_accuracy']:.2f} % | {r['train_time_s']:,.0f} | "
            f"{r['images_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def report(workdir: str | os.PathLike) -> str:
    """The table of ``workdir/history.json`` (or of a history file given directly)."""
    path = Path(workdir)
    path = path / "history.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; give a work dir of `hw2jax ... train`.")
    history = json.loads(path.read_text())
    unit = "reviews" if "valid_accuracy" in (history.get("epochs") or [{}])[0] else "images"
    return f"status: {history.get('status', 'unknown')}\n\n" + epoch_table(history, unit)
