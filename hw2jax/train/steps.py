"""What one training step is: the train state, the jit-compiled train and eval steps, the
optimizer and evaluation over a split. The loop (:mod:`hw2jax.train.loop`) drives them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from hw2jax.errors import InputError
from hw2jax.train import checkpoints
from hw2jax.train.sharding import DataParallel

Batch = dict[str, jax.Array]
Params = Any


class Task(Protocol):
    """What an experiment gives the loop. Every batch carries a float ``mask`` of shape
    [batch] that is 0 for padding examples, so partial batches count exactly."""

    unit: str  # what the examples are called, plural ("images"): progress and throughput

    def init_params(self, rng: jax.Array) -> Params: ...

    def apply(self, params: Params, batch: Batch, *, train: bool, rng: jax.Array) -> jax.Array: ...

    def losses(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Per-example (loss, correct), each [batch]."""
        ...

    def train_batches(self, epoch: int) -> Sequence[Batch]: ...

    def eval_batches(self, split: str) -> Sequence[Batch]: ...

    # Optional: ``frozen_keys`` (top-level params not trained) and ``compiler_options``.


class TrainState(struct.PyTreeNode):
    """Step, params and optimizer state. Top-level params named in ``frozen`` (a pretrained
    encoder) get no gradient, no update and no optimizer state."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    frozen: tuple[str, ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def create(
        cls, params: Params, tx: optax.GradientTransformation, frozen: tuple[str, ...] = ()
    ) -> TrainState:
        trainable = {k: v for k, v in params.items() if k not in frozen}
        return cls(jnp.zeros((), jnp.int32), params, tx.init(trainable), tx, tuple(frozen))

    def trainable(self) -> Params:
        return {k: v for k, v in self.params.items() if k not in self.frozen}

    def apply_gradients(self, grads: Params) -> TrainState:
        """``grads`` covers the trainable params only."""
        trainable = self.trainable()
        updates, opt_state = self.tx.update(grads, self.opt_state, trainable)
        params = {**self.params, **optax.apply_updates(trainable, updates)}
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def _masked_sums(task: Task, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    loss, correct = task.losses(outputs, batch)
    mask = batch["mask"]
    return {
        "loss_sum": jnp.sum(loss * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }


def make_train_step(task: Task, rng: jax.Array) -> Callable[[TrainState, Batch], tuple]:
    def train_step(state: TrainState, batch: Batch):
        step_rng = jax.random.fold_in(rng, state.step)

        def loss_fn(trainable):
            params = {**state.params, **trainable}
            outputs = task.apply(params, batch, train=True, rng=step_rng)
            sums = _masked_sums(task, outputs, batch)
            return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

        grads, sums = jax.grad(loss_fn, has_aux=True)(state.trainable())
        return state.apply_gradients(grads=grads), sums

    return jax.jit(train_step, donate_argnums=0, compiler_options=_compiler_options(task))


def make_eval_step(task: Task) -> Callable[[Params, Batch], dict[str, jax.Array]]:
    def eval_step(params, batch):
        outputs = task.apply(params, batch, train=False, rng=jax.random.key(0))
        return _masked_sums(task, outputs, batch)

    return jax.jit(eval_step, compiler_options=_compiler_options(task))


def _compiler_options(task: Task) -> dict[str, str] | None:
    """XLA options a task asks for its steps (``task.compiler_options``, optional)."""
    return getattr(task, "compiler_options", None) or None


def evaluate(
    task: Task, params: Params, split: str, eval_step=None, parallel: DataParallel | None = None
) -> dict[str, float]:
    eval_step = eval_step or make_eval_step(task)
    totals = None
    for batch in task.eval_batches(split):
        sums = eval_step(params, parallel.shard_batch(batch) if parallel else batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "loss": float(totals["loss_sum"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "count": int(count),
    }


# --------------------------------------------------------------------------- optimizer


def scale_by_path(scale: Callable[[tuple[str, ...]], float]) -> optax.GradientTransformation:
    """Multiplies each parameter's update by ``scale(path)``, its path a tuple of names such
    as ("bert", "layer_3", "query", "kernel"): per-parameter learning rates (layer-wise decay)."""

    def update(updates, state, params=None):
        def scaled(path, u):
            return u * scale(checkpoints.path_names(path))

        return jax.tree_util.tree_map_with_path(scaled, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    learning_rate_scale: Callable[[tuple[str, ...]], float] | None = None,
):
    """``adam_l2``: torch.optim.Adam(weight_decay=wd), i.e. wd * param added to the gradient
    before Adam (coupled L2). ``adamw``: decoupled decay, with warm-up and cosine decay.
    ``learning_rate_scale(path)`` multiplies each parameter's update, decay included, as a
    per-group learning rate does in torch."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "warmup_cosine":
        warmup = int(config.warmup_epochs * steps_per_epoch)
        lr = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, max(warmup, 1), max(total, warmup + 1)
        )
    else:
        lr = config.learning_rate
    if config.optimizer == "adam_l2":
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.scale_by_adam(eps=1e-8),
            optax.scale_by_learning_rate(lr),
        )
    elif config.optimizer == "adamw":
        # No decay on biases, norms and embeddings-of-one (vectors): the usual AdamW practice.
        mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
        tx = optax.adamw(lr, weight_decay=config.weight_decay, mask=mask)
    else:
        raise InputError(f"unknown optimizer {config.optimizer!r}; choose adam_l2 or adamw.")
    if learning_rate_scale is not None:
        tx = optax.chain(tx, scale_by_path(learning_rate_scale))
    if config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


def parameter_counts(state: TrainState) -> dict[str, int]:
    """Scalars in all params, and in those the optimizer updates (frozen ones excluded)."""

    def size(tree) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

    return {"total": size(state.params), "trainable": size(state.trainable())}
