"""Multi-query associative recall: one attention variant per small causal LM, trained by the
shared loop, and the sweep over variants, sequence lengths and widths that compares them by
recall accuracy against the state each carries (Zoology: Arora et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hw2jax.attention import registry
from hw2jax.config import LOOP_SCHEMA, Field, check_config
from hw2jax.cpu import machine
from hw2jax.data.mqar import check_sizes, make_mqar
from hw2jax.errors import InputError
from hw2jax.models.layers import init_on_dummy
from hw2jax.models.recall import RecallLM, state_size
from hw2jax.train import hooks, loop, run_files, steps
from hw2jax.train import sweep as sweep_runs
from hw2jax.train.batching import IndexBatches, chunk


def _positive_ints(value) -> bool:
    return len(value) > 0 and all(isinstance(v, int) and v >= 1 for v in value)


SCHEMA = {
    **LOOP_SCHEMA,
    "eval_split": Field(str, choices=("test",)),
    "data_source": Field(str, choices=("generated",)),
    "seq_len": Field(int, min=4),
    "num_pairs": Field(int, "0 (seq_len // 16) or a positive count", check=lambda v: v >= 0),
    "vocab_size": Field(int, min=4),
    "train_size": Field(int, min=1),
    "test_size": Field(int, min=1),
    "model": {
        "dim": Field(int, min=1),
        "heads": Field(int, min=1),
        "depth": Field(int, min=1),
        # Read when checking: a config file may import a module that registers its own.
        "mixer": Field(str, choices=lambda: registry.names(causal=True)),
    },
    "sweep": {
        "mixers": Field(
            tuple,
            "a tuple of registered attention variants with a causal form "
            "(hw2jax.attention.registry.names(causal=True))",
            check=lambda v: set(v) <= set(registry.names(causal=True)),
        ),
        "seq_lens": Field(tuple, "a tuple of positive lengths", check=_positive_ints),
        "dims": Field(tuple, "a tuple of positive widths", check=_positive_ints),
    },
}


def num_pairs(config: ml_collections.ConfigDict) -> int:
    return config.num_pairs or config.seq_len // 16


def check(config: ml_collections.ConfigDict) -> None:
    """The whole config against :data:`SCHEMA`, then the sizes, before any work."""
    check_config(config.to_dict(), SCHEMA)
    if not config.num_pairs and config.seq_len < 16:  # the schema keeps seq_len >= 4
        raise InputError(
            f"seq_len {config.seq_len} gives num_pairs = seq_len // 16 = 0 key-value pairs; "
            f"use seq_len >= 16 or set num_pairs (1 to {(config.seq_len - 1) // 2}), e.g. "
            "--set num_pairs=1."
        )
    check_sizes(config.seq_len, num_pairs(config), config.vocab_size)
    if config.model.dim % config.model.heads:
        raise InputError(
            f"model.dim {config.model.dim} must be a multiple of model.heads "
            f"{config.model.heads}; e.g. --set model.heads=2."
        )


class MQARTask:
    """Per sequence: the mean cross-entropy over its queries and the share recalled."""

    unit = "sequences"

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = RecallLM(config.vocab_size, **config.model.to_dict())
        pairs, t, v = num_pairs(config), config.seq_len, config.vocab_size
        # Different seeds, so no test sequence is a training one except by chance.
        train = make_mqar(config.train_size, t, pairs, v, seed=2 * config.seed)
        test = make_mqar(config.test_size, t, pairs, v, seed=2 * config.seed + 1)
        self.splits = {
            "train": {k: jnp.asarray(a) for k, a in train.items()},
            "test": {k: jnp.asarray(a) for k, a in test.items()},
        }
        self.shuffle_key = jax.random.key(config.seed + 1)
        self._init = jax.jit(
            lambda key: init_on_dummy(self.model, key, jnp.zeros((1, t), jnp.int32))
        )

    def init_params(self, rng: jax.Array):
        return self._init(rng)

    def apply(self, params, batch, *, train: bool, rng: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, batch["tokens"])

    def losses(self, logits: jax.Array, batch: steps.Batch) -> tuple[jax.Array, jax.Array]:
        targets = batch["targets"]
        asked = (targets >= 0).astype(jnp.float32)
        count = jnp.maximum(asked.sum(-1), 1.0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
        right = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        return (ce * asked).sum(-1) / count, (right * asked).sum(-1) / count

    def train_batches(self, epoch: int) -> IndexBatches:
        n = self.config.train_size
        order = np.asarray(jax.random.permutation(jax.random.fold_in(self.shuffle_key, epoch), n))
        data = self.splits["train"]
        return IndexBatches(data, chunk(order, self.config.batch_size), self.config.batch_size)

    def eval_batches(self, split: str) -> IndexBatches:
        size = self.config.eval_batch_size
        data = self.splits[split]
        n = data["tokens"].shape[0]
        return IndexBatches(data, chunk(np.arange(n), size), size)


@run_files.one_process_per_workdir(check)
def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    extra_hooks: Sequence[hooks.Hook] = (),
) -> dict[str, Any]:
    """One model: trains, evaluates on the test sequences each epoch, resumes from workdir."""
    workdir = Path(workdir)
    run_files.save_run_config(workdir, config)
    task = MQARTask(config)
    return loop.train_and_evaluate(task, config, workdir, extra_hooks=extra_hooks)


def run_name(mixer: str, seq_len: int, dim: int) -> str:
    return f"{mixer}_T{seq_len}_d{dim}"


def sweep(config: ml_collections.ConfigDict, workdir: str | Path) -> list[dict[str, Any]]:
    """Every (mixer, seq_len, dim) of ``config.sweep``, each in its own work dir under
    ``workdir`` (a finished one is read back, an interrupted one resumes); then the table
    (``results.md``, ``results.json``) and the plot (``recall_vs_state.png``) in ``workdir``."""
    workdir = Path(workdir)
    runs = [
        _run_config(config, mixer, t, d)
        for t in config.sweep.seq_lens
        for d in config.sweep.dims
        for mixer in config.sweep.mixers
    ]
    for run in runs:  # every config checked before the first one trains
        check(run)
    named = [(run_name(r.model.mixer, r.seq_len, r.model.dim), r) for r in runs]
    histories = sweep_runs.run_each(named, workdir, train_and_evaluate)
    rows = [
        {
            "mixer": run.model.mixer,
            "seq_len": run.seq_len,
            "num_pairs": num_pairs(run),
            "dim": run.model.dim,
            "heads": run.model.heads,
            "state_size": state_size(run.model.mixer, run.model.dim, run.model.heads, run.seq_len),
            "test_accuracy": done["epochs"][-1]["test_accuracy"],
            "wall_time_s": done.get("wall_time_s"),
        }
        for run, done in zip(runs, histories, strict=False)
    ]
    if len(rows) < len(runs):
        return rows  # stopped: the next call resumes there
    run_files.write_json_atomic(
        workdir / "results.json", {"config": config.to_dict(), "runs": rows, "machine": machine()}
    )
    (workdir / "results.md").write_text(results_table(rows))
    plot_recall(rows, workdir / "recall_vs_state.png")
    return rows


def _heads(config: ml_collections.ConfigDict, dim: int) -> int:
    """The config's head size (model.dim // model.heads) kept across widths."""
    head_dim = config.model.dim // config.model.heads
    return max(1, dim // head_dim)


def _run_config(
    config: ml_collections.ConfigDict, mixer: str, seq_len: int, dim: int
) -> ml_collections.ConfigDict:
    run = ml_collections.ConfigDict(config.to_dict())
    run.seq_len = seq_len
    run.model.mixer = mixer
    run.model.heads = _heads(config, dim)
    run.model.dim = dim
    return run


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per mixer and width, one column per sequence length."""
    lengths = sorted({r["seq_len"] for r in rows})
    cells = {(r["mixer"], r["dim"], r["seq_len"]): r for r in rows}
    head = "| mixer | dim | " + " | ".join(
        f"T = {t} ({next(r['num_pairs'] for r in rows if r['seq_len'] == t)} pairs)"
        for t in lengths
    )
    lines = [head + " |", "|---|---|" + "---|" * len(lengths)]
    for mixer, dim in dict.fromkeys((r["mixer"], r["dim"]) for r in rows):
        row = [
            f"{100 * cells[mixer, dim, t]['test_accuracy']:.1f} % "
            f"(state {cells[mixer, dim, t]['state_size']:,})"
            if (mixer, dim, t) in cells
            else ""
            for t in lengths
        ]
        lines.append(f"| {mixer} | {dim} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_recall(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per sequence length: test recall against state size (log), a line per mixer
    through its widths."""
    from hw2jax.train.plots import new_figure, save_figure

    lengths = sorted({r["seq_len"] for r in rows})
    fig = new_figure((4 * len(lengths), 3.6))
    axes = fig.subplots(1, len(lengths), squeeze=False)
    for ax, t in zip(axes[0], lengths, strict=True):
        for mixer in dict.fromkeys(r["mixer"] for r in rows):
            points = sorted(
                (r["state_size"], 100 * r["test_accuracy"])
                for r in rows
                if r["mixer"] == mixer and r["seq_len"] == t
            )
            if points:
                ax.plot(*zip(*points, strict=True), "o-", label=mixer)
        pairs = next(r["num_pairs"] for r in rows if r["seq_len"] == t)
        ax.set(
            xscale="log", xlabel="state size (floats per layer)", title=f"T = {t}, {pairs} pairs"
        )
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test recall accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
