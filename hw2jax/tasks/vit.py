"""The ViT-on-FashionMNIST experiment: the task the shared training loop runs, and evaluation."""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hw2jax.attention import registry
from hw2jax.config import LOOP_SCHEMA, Field, apply_overrides, check_config
from hw2jax.cpu import machine
from hw2jax.data import fashion_mnist, splits
from hw2jax.errors import InputError
from hw2jax.models.layers import init_on_dummy
from hw2jax.models.vit import ViT, xla_compiler_options
from hw2jax.train import checkpoints, hooks, loop, plots, run_files, steps, sweep
from hw2jax.train.batching import IndexBatches, chunk

_POSITIVE = Field(int, min=1)
RECIPE = "recipe"  # the ablation's run of the config as it stands
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _variants_ok(variants: dict) -> bool:
    return all(
        _RUN_NAME.fullmatch(name) and name != RECIPE and isinstance(items, str) and items.split()
        for name, items in variants.items()
    )


SCHEMA = {
    **LOOP_SCHEMA,
    "eval_split": Field(str, choices=("test", "valid")),
    # valid: this many training images, drawn with split_seed, held out for choosing recipes.
    "valid_size": Field(
        int, "it must leave images to train on (< 60,000)", min=0, check=lambda v: v < 60_000
    ),
    "split_seed": Field(int),
    "label_smoothing": Field(float, "it must be below 1", min=0.0, check=lambda v: v < 1),
    "augment_pad": Field(int, min=0),
    "augment_flip": Field(bool),
    # Random erasing (Zhong et al. 2017): the chance that one rectangle of noise covers 2-25 %
    # of an image.
    "augment_erase": Field(float, "it is a probability (<= 1)", min=0.0, check=lambda v: v <= 1),
    "data_source": Field(str, choices=("auto", "idx", "tfds")),
    # False: stop at valid (a recipe search); the chosen recipe's command, rerun with True,
    # reads test once.
    "read_test": Field(bool),
    # `hw2jax vit ablate`: name -> the --set items ("key=value key=value") of one variant of
    # this recipe; every variant trains in its own work dir and is compared on valid.
    "ablation": Field(
        dict,
        "each entry maps a run name (letters, digits, _ and -; not 'recipe', the recipe's own "
        "run) to that variant's --set items",
        check=_variants_ok,
    ),
    "model": {
        **{k: _POSITIVE for k in ("image_size", "patch_size", "channels", "dim", "depth")},
        **{k: _POSITIVE for k in ("heads", "dim_head", "mlp_dim")},
        "pool": Field(str, choices=("cls", "mean")),
        # Read when checking: a config file may import a module that registers its own.
        "attention": Field(str, choices=lambda: registry.names(bidirectional=True)),
        "dtype": Field(str, choices=("float32", "bfloat16")),
        # None: regrouped products when dim <= dim_head; True/False force one form.
        "merged_attention": Field((type(None), bool)),
    },
}


def check(config: ml_collections.ConfigDict) -> None:
    """The whole config against :data:`SCHEMA`, before any data is read or compiled."""
    name = config.model.attention
    if isinstance(name, str) and name in registry.names(bidirectional=False):
        raise InputError(
            f"model.attention={name!r} cannot run in the ViT. " + registry.get(name).missing_form
        )
    check_config(config.to_dict(), SCHEMA)
    if not config.read_test and config.eval_split == "test":
        raise InputError(
            "read_test=False keeps the test set unread, but eval_split='test' reads it after "
            "every epoch: set eval_split=valid (with valid_size and best_metric=valid_accuracy)."
        )
    if config.eval_split == "valid" and not config.valid_size:
        raise InputError(
            "eval_split='valid' needs a validation split: set valid_size, e.g. "
            "--set valid_size=5000 (held out from the 60,000 training images)."
        )
    model = config.model
    if model.image_size % model.patch_size:
        raise InputError(
            f"model.image_size {model.image_size} is not a multiple of model.patch_size "
            f"{model.patch_size}; pick a patch size that divides it (e.g. 4 for 28)."
        )


def augment(rng: jax.Array, images: jax.Array, pad: int, flip: bool) -> jax.Array:
    """Random translation by up to ``pad`` pixels (zero fill) and random horizontal flips."""
    b, h, w, _ = images.shape
    k_shift, k_flip = jax.random.split(rng)
    if pad:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * pad + 1)
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))  # noqa: E731
        images = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        images = jnp.where(do_flip, images[:, :, ::-1], images)
    return images


def random_erase(rng: jax.Array, images: jax.Array, prob: float) -> jax.Array:
    """With probability ``prob`` per image, fills one random rectangle of 2-25 % of its area
    (aspect ratio 0.3-3.3) with uniform noise over the pixel range [0, 255]."""
    b, h, w, _ = images.shape
    keys = jax.random.split(rng, 6)
    erase = jax.random.bernoulli(keys[0], prob, (b,))
    area = jax.random.uniform(keys[1], (b,), minval=0.02, maxval=0.25) * h * w
    ratio = jnp.exp(jax.random.uniform(keys[2], (b,), minval=math.log(0.3), maxval=math.log(3.3)))
    eh = jnp.clip(jnp.round(jnp.sqrt(area * ratio)), 1, h)
    ew = jnp.clip(jnp.round(jnp.sqrt(area / ratio)), 1, w)
    top = jnp.floor(jax.random.uniform(keys[3], (b,)) * (h - eh + 1))
    left = jnp.floor(jax.random.uniform(keys[4], (b,)) * (w - ew + 1))
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    inside = (
        erase[:, None, None]
        & (rows >= top[:, None, None])
        & (rows < (top + eh)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + ew)[:, None, None])
    )
    noise = jax.random.uniform(keys[5], images.shape, images.dtype, 0.0, 255.0)
    return jnp.where(inside[..., None], noise, images)


def _on_device(images: np.ndarray, labels: np.ndarray) -> dict[str, jax.Array]:
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


class ViTTask:
    """FashionMNIST classification with the ViT; all data lives on the device."""

    num_classes = 10
    unit = "images"

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        train: fashion_mnist.ImageSplit,
        test: fashion_mnist.ImageSplit,
    ):
        self.config = config
        model = config.model.to_dict()
        # bf16 compute with float32 params and optimizer state: mixed precision.
        name = model.get("dtype", "float32")
        if name not in ("float32", "bfloat16"):
            raise InputError(
                f"model.dtype must be 'float32' or 'bfloat16', got {name!r}; "
                "e.g. --set model.dtype=bfloat16."
            )
        model["dtype"] = jnp.dtype(name)
        if model.get("merged_attention") not in (None, True, False):
            raise InputError(
                "model.merged_attention must be None (automatic), True or False, got "
                f"{model['merged_attention']!r}."
            )
        self.model = ViT(num_classes=self.num_classes, **model)
        self.compiler_options = xla_compiler_options(model["dtype"])  # read by train.steps
        self.splits = {"test": _on_device(test.images, test.labels)}
        valid_size = config.get("valid_size", 0)
        if valid_size:
            n = len(train.labels)
            kept, held = splits.train_valid_split(n, n - valid_size, config.get("split_seed", 0))
            self.splits["valid"] = _on_device(train.images[held], train.labels[held])
            train = fashion_mnist.ImageSplit(train.images[kept], train.labels[kept])
        self.splits["train"] = _on_device(train.images, train.labels)
        self.shuffle_key = jax.random.key(config.seed + 1)
        # Under jit: one compilation, where eager init compiles each initializer (~100) apart.
        self._init = jax.jit(lambda key: init_on_dummy(self.model, key, jnp.zeros((1, 28, 28, 1))))

    def init_params(self, rng: jax.Array):
        return self._init(rng)

    def apply(self, params, batch, *, train: bool, rng: jax.Array) -> jax.Array:
        images = batch["image"].astype(jnp.float32)
        if train and (self.config.augment_pad or self.config.augment_flip):
            images = augment(rng, images, self.config.augment_pad, self.config.augment_flip)
        if train and self.config.get("augment_erase", 0.0):
            images = random_erase(jax.random.fold_in(rng, 1), images, self.config.augment_erase)
        return self.model.apply({"params": params}, fashion_mnist.normalize(images))

    def losses(self, logits: jax.Array, batch: steps.Batch) -> tuple[jax.Array, jax.Array]:
        labels = jax.nn.one_hot(batch["label"], self.num_classes)
        if self.config.label_smoothing:
            labels = optax.smooth_labels(labels, self.config.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, labels)
        return loss, (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)

    def train_batches(self, epoch: int) -> IndexBatches:
        data = self.splits["train"]
        n = data["label"].shape[0]
        order = np.asarray(jax.random.permutation(jax.random.fold_in(self.shuffle_key, epoch), n))
        return IndexBatches(data, chunk(order, self.config.batch_size), self.config.batch_size)

    def eval_batches(self, split: str) -> IndexBatches:
        data = self.splits[split]
        size = self.config.eval_batch_size
        return IndexBatches(data, chunk(np.arange(data["label"].shape[0]), size), size)

    def predict(self, params, split: str) -> np.ndarray:
        apply = jax.jit(lambda p, b: jnp.argmax(self.apply(p, b, train=False, rng=None), -1))
        preds = [
            np.asarray(apply(params, b))[np.asarray(b["mask"]) > 0]
            for b in self.eval_batches(split)
        ]
        return np.concatenate(preds)


def load_data(config: ml_collections.ConfigDict):
    source = fashion_mnist.find_source(config.data_dir or None, config.data_source)
    print(f"FashionMNIST from {source.description}", file=sys.stderr)
    return fashion_mnist.load(source, "train"), fashion_mnist.load(source, "test")


def write_report(task: ViTTask, params, workdir: Path, history: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy of ``params`` on all 10,000 images, with the confusion matrix and a grid."""
    preds = task.predict(params, "test")
    labels = np.asarray(task.splits["test"]["label"])
    cm = plots.confusion_matrix(labels, preds, task.num_classes)
    names = fashion_mnist.CLASS_NAMES
    plots.plot_confusion(cm, names, workdir / "confusion_matrix.png")
    plots.plot_predictions(
        np.asarray(task.splits["test"]["image"][:32]),
        preds[:32],
        labels[:32],
        names,
        workdir / "test_predictions.png",
    )
    return {
        "test_accuracy": float(np.mean(preds == labels)),
        "test_count": len(labels),
        "confusion_matrix": cm.tolist(),
    }


@run_files.one_process_per_workdir(check)
def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    extra_hooks: Sequence[hooks.Hook] = (),
) -> dict[str, Any]:
    """Trains and evaluates the ViT; ``extra_hooks`` join the loop's (:mod:`hw2jax.train.hooks`)."""
    workdir = Path(workdir)
    run_files.save_run_config(workdir, config)
    train, test = load_data(config)
    task = ViTTask(config, train, test)
    start = time.perf_counter()
    history = loop.train_and_evaluate(task, config, workdir, extra_hooks=extra_hooks)
    if history["status"] != "done" or loop.test_withheld(config):
        return history
    params = jax.device_get(loop.latest_params(task, config, workdir))
    final = write_report(task, params, workdir, history)
    final["wall_time_s_this_run"] = time.perf_counter() - start
    final["last_epoch"] = history["epochs"][-1] if history["epochs"] else None
    final["machines"] = history["machines"]
    run_files.write_json_atomic(workdir / "results.json", final)
    print(
        f"final test accuracy (last epoch): {100 * final['test_accuracy']:.2f}% "
        f"on {final['test_count']} images; plots and history in {workdir}"
    )
    return history | {"final": final}


def evaluate_workdir(workdir: str | Path, data_dir: str | None = None, best: bool = True) -> dict:
    """Re-evaluates the best (or latest) checkpoint in ``workdir`` on the test set."""
    workdir = Path(workdir)
    config = run_files.load_run_config(workdir, "hw2jax vit train", marker="model")
    if data_dir:
        config.data_dir = data_dir
    train, test = load_data(config)
    task = ViTTask(config, train, test)
    if best:
        params, meta = checkpoints.Checkpoints(workdir / "checkpoints").restore_best_params(
            task.init_params(jax.random.key(0))
        )
    else:
        params, meta = loop.latest_params(task, task.config, workdir), {}
    metrics = steps.evaluate(task, params, "test")
    return {"checkpoint": meta, **metrics}


def ablation_runs(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
    """The recipe and each variant of ``config.ablation`` (the recipe with that variant's
    ``--set`` items), all checked before anything trains."""
    check(config)
    if not config.ablation:
        raise InputError(
            "this config has no ablation: give it c.ablation = {'name': 'key=value ...'}, one "
            "entry per variant (experiments/vit_fashion_mnist_ablation.py has one)."
        )
    if config.eval_split != "valid":
        raise InputError(
            "an ablation compares its runs on valid: set eval_split=valid, valid_size (e.g. "
            "5000) and best_metric=valid_accuracy."
        )
    runs = [(RECIPE, ml_collections.ConfigDict(config.to_dict()))]
    for name, items in config.ablation.items():
        run = ml_collections.ConfigDict(config.to_dict())
        try:
            apply_overrides(run, items.split())
            check(run)
        except InputError as error:
            raise InputError(f"ablation variant {name!r} ({items}): {error}") from None
        runs.append((name, run))
    return runs


def ablate(config: ml_collections.ConfigDict, workdir: str | Path) -> list[dict[str, Any]]:
    """Trains the recipe and each variant of ``config.ablation``, each in its own work dir
    under ``workdir`` (resumable run by run). When all are done, writes ``ablation.md`` and
    ``ablation.json`` there: each run's best valid accuracy and its difference from the
    recipe's. Returns the rows so far (fewer than the runs when one stopped)."""
    workdir = Path(workdir)
    runs = ablation_runs(config)
    histories = sweep.run_each(runs, workdir, train_and_evaluate)
    rows = []
    for (name, _), history in zip(runs, histories, strict=False):
        best = max(history["epochs"], key=lambda r: r["valid_accuracy"])
        rows.append(
            {
                "run": name,
                "changes": config.ablation.get(name, ""),
                "valid_accuracy": best["valid_accuracy"],
                "epoch": best["epoch"],
                "epochs": len(history["epochs"]),
                "train_time_s": sum(r["train_time_s"] for r in history["epochs"]),
            }
        )
    if len(rows) < len(runs):
        return rows
    for row in rows:
        row["vs_recipe_points"] = 100 * (row["valid_accuracy"] - rows[0]["valid_accuracy"])
    record = {"config": config.to_dict(), "runs": rows, "machine": machine()}
    run_files.write_json_atomic(workdir / "ablation.json", record)
    (workdir / "ablation.md").write_text(ablation_table(rows))
    return rows


def ablation_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per run, best valid accuracy and its difference from the recipe's."""
    lines = [
        "| run | changes from the recipe | best valid accuracy (epoch) | vs the recipe (points) "
        "| training time (s, epochs summed) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        changes = f"`{r['changes']}`" if r["changes"] else "none"
        delta = "" if r["run"] == RECIPE else f"{r['vs_recipe_points']:+.2f}"
        lines.append(
            f"| {r['run']} | {changes} | {100 * r['valid_accuracy']:.2f} % ({r['epoch']} of "
            f"{r['epochs']}) | {delta} | {r['train_time_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"
