"""A run's per-epoch table in Markdown, from its ``history.json`` (``hw2jax report WORKDIR``),
and the evaluated accuracy of several runs side by side, epoch by epoch, with their curves on
one plot (``--against``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hw2jax.errors import InputError, MissingFileError
from hw2jax.train import plots, run_files


def _split(history: dict) -> str | None:
    rows = history.get("epochs") or [{}]
    return next((k.removesuffix("_accuracy") for k in rows[0] if k.endswith("_accuracy")), None)


def unit(history: dict) -> str:
    """What the run's examples are called; histories written before the loop recorded it are
    told apart by their config (IMDB's names an encoder, MQAR's a sequence length)."""
    if history.get("unit"):
        return history["unit"]
    config = history.get("config", {})
    return "reviews" if "encoder" in config else "sequences" if "seq_len" in config else "images"


def rate_text(rate: float) -> str:
    return f"{rate:.1f}" if rate < 10 else f"{rate:,.0f}"


def timing(record: dict[str, Any], unit: str) -> str:
    """An epoch's time and throughput, saying so when they cover only the steps after a resume
    within the epoch (the steps before ran in another process, untimed)."""
    text = f"{record['train_time_s']:,.0f} s, {rate_text(record[f'{unit}_per_s'])} {unit}/s"
    if "timed_from_step" in record:
        steps = record["step"] - record["timed_from_step"]
        text += f" over the {steps:,} steps after the resume at step {record['timed_from_step']:,}"
    return text


def epoch_table(history: dict) -> str:
    """One row per finished epoch: losses, the evaluated split's accuracy, time and throughput."""
    rows = history.get("epochs", [])
    if not rows:
        return "(no finished epoch)"
    split, name = _split(history), unit(history)
    lines = [
        f"| epoch | train loss | {split} loss | {split} accuracy | epoch time (s) | {name}/s |",
        "|---|---|---|---|---|---|",
    ]
    resumed = [r for r in rows if "timed_from_step" in r]
    for r in rows:
        mark = "*" if "timed_from_step" in r else ""
        lines.append(
            f"| {r['epoch']} | {r['train_loss']:.4f} | {r[f'{split}_loss']:.4f} | "
            f"{100 * r[f'{split}_accuracy']:.2f} % | {r['train_time_s']:,.0f}{mark} | "
            f"{rate_text(r.get(f'{name}_per_s', r.get('images_per_s')))}{mark} |"
        )
    if resumed:
        lines.append("")
        lines.append(
            "\\* timed over the steps after a resume within the epoch only (from step "
            + ", ".join(f"{r['timed_from_step']:,} in epoch {r['epoch']}" for r in resumed)
            + ")."
        )
    return "\n".join(lines)


def comparison_table(histories: dict[str, dict]) -> str:
    """The evaluated accuracy of each run (one row, named by its key) at every epoch (one
    column); a run that has not reached an epoch leaves its cell empty."""
    splits = {name: _split(h) for name, h in histories.items() if h.get("epochs")}
    if len(set(splits.values())) > 1:
        named = ", ".join(f"{name}: {split}" for name, split in splits.items())
        raise InputError(
            f"the runs were evaluated on different splits ({named}); compare like runs."
        )
    split = next(iter(splits.values()), "test")
    epochs = max((r["epoch"] for h in histories.values() for r in h.get("epochs", [])), default=0)
    lines = [
        f"| {split} accuracy (%) | " + " | ".join(str(e) for e in range(1, epochs + 1)) + " |",
        "|---|" + "---|" * epochs,
    ]
    for name, history in histories.items():
        by_epoch = {r["epoch"]: r[f"{split}_accuracy"] for r in history.get("epochs", [])}
        cells = [f"{100 * by_epoch[e]:.2f}" if e in by_epoch else "" for e in range(1, epochs + 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def auto_paths(history: dict) -> dict[str, dict]:
    """What auto took by timing in this run, class by class (each machine's ``auto_paths``
    entry; a resume on another machine may take another path, and the later one is shown)."""
    taken = {}
    for machine in history.get("machines", []):
        taken.update(machine.get("auto_paths", {}))
    return taken


def machine_line(machine: dict) -> str:
    """One machine that trained a run (its entry in ``history["machines"]``): the CPU, its
    cores and vector features, jax, the code's commit, the day it first trained the run and
    the settings that change paths or numbers; what an older record lacks is left out."""
    text = machine.get("cpu_model") or "an unnamed CPU"
    if machine.get("cpu_family_model"):
        text += f" (family/model {machine['cpu_family_model']})"
    cores, usable = machine.get("cpu_count"), machine.get("usable_cores")
    if cores:
        text += f", {cores} cores" + (f" ({usable} usable)" if usable and usable != cores else "")
    features = [name for name, has in machine.get("cpu_features", {}).items() if has]
    if features:
        text += ", " + " ".join(features)
    details = [f"jax {machine['jax']}"] if machine.get("jax") else []
    if "commit" in machine:
        details.append(f"commit {machine['commit'] or 'unknown (not a checkout)'}")
    if machine.get("date"):
        details.append(f"from {machine['date']}")
    settings = [k if len(v) > 40 else f"{k}={v}" for k, v in machine.get("env", {}).items()]
    if settings:
        details.append("settings " + ", ".join(settings))
    return f"- {text}" + (f"; {', '.join(details)}" if details else "")


def times_text(ms: dict[str, float]) -> str:
    """A class's paths and their milliseconds, as a report and ``hw2jax machine`` list them."""
    return ", ".join(f"{name} {t:g}" for name, t in ms.items()) + " ms"


def _taken(record: dict) -> str:
    return f"{record['path']} ({times_text(record['ms'])})"


def paths_list(history: dict) -> str:
    """One line per shape class that auto decided by timing: the path taken and the times."""
    return "\n".join(f"- {key}: {_taken(r)}" for key, r in sorted(auto_paths(history).items()))


def differing_paths(histories: dict[str, dict]) -> str:
    """The shape classes that the runs share and auto decided differently in (a fresh probe
    on a near tie, another machine): where their numbers may part from the first step."""
    taken = {name: auto_paths(h) for name, h in histories.items()}
    shared = set.intersection(*(set(t) for t in taken.values()))
    differ = sorted(k for k in shared if len({t[k]["path"] for t in taken.values()}) > 1)
    if not differ:
        return f"auto took the same path in all {len(shared)} timed classes the runs share."
    lines = [
        "| class auto took differently | " + " | ".join(taken) + " |",
        "|---|" + "---|" * len(taken),
    ]
    for key in differ:
        lines.append(f"| {key} | " + " | ".join(_taken(t[key]) for t in taken.values()) + " |")
    return "\n".join(lines)


def _history(workdir: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(workdir)
    path = path / "history.json" if path.is_dir() else path
    if not path.is_file():
        raise MissingFileError(f"{path} not found; give a work dir of `hw2jax ... train`.")
    return path, run_files.read_json(path, "its run's table cannot be made; see its log instead.")


def report(
    workdir: str | os.PathLike,
    against: tuple[str | os.PathLike, ...] = (),
    plot: str | os.PathLike | None = None,
) -> str:
    """The table of ``workdir/history.json`` (or of a history file given directly), then, with
    ``against`` (other work dirs or history files), the accuracies of all of them per epoch,
    and their curves drawn to ``plot`` (default: ``compared.png`` beside the first history)."""
    path, history = _history(workdir)
    text = f"status: {run_files.status(path.parent, history)}\n\n" + epoch_table(history)
    if not against:
        if history.get("machines"):
            text += "\n\ntrained on:\n" + "\n".join(map(machine_line, history["machines"]))
        if auto_paths(history):
            text += "\n\npaths auto took by timing (shape class: path, both times):\n"
            text += paths_list(history)
        return text
    runs = {}
    for where, (p, h) in [(workdir, (path, history))] + [(w, _history(w)) for w in against]:
        label = p.parent.name if p.name == "history.json" else p.stem
        runs[label if label not in runs else str(where)] = h
    text += "\n\n" + comparison_table(runs)
    if all(auto_paths(h) for h in runs.values()):
        text += "\n\n" + differing_paths(runs)
    plot = Path(plot) if plot else path.parent / "compared.png"
    plots.plot_comparison(runs, _split(history) or "test", plot)
    return text + f"\n\ncurves of the {len(runs)} runs drawn in {plot}"
