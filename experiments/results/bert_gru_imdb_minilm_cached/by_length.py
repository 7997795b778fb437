"""Valid accuracy and positive-prediction rate by padded length, for a finished sentiment run's
best and latest params: `python by_length.py WORKDIR` (features come from the shared cache)."""

import sys
from pathlib import Path

import jax
import numpy as np

from hw2jax.tasks import sentiment
from hw2jax.train import checkpoints, loop, run_files


def main(workdir: Path) -> None:
    config = run_files.load_run_config(workdir, "hw2jax sentiment train", marker="encoder")
    bert_config, bert_params, tokenizer = sentiment.load_encoder(config)
    data = sentiment.prepare_data(config, tokenizer, workdir)
    data = {k: v for k, v in data.items() if k in ("train", "valid")}
    features = sentiment.cache_features(config, data, bert_config, bert_params, tokenizer)
    task = sentiment.SentimentTask(config, data, bert_config, bert_params, features)
    like = task.init_params(jax.random.key(0))
    best, meta = checkpoints.Checkpoints(workdir / "checkpoints").restore_best_params(like)
    latest = loop.latest_params(task, config, workdir)
    apply = jax.jit(lambda p, b: task.apply(p, b, train=False, rng=None))
    for name, params in ((f"best (epoch {meta['epoch']})", best), ("latest", latest)):
        pred, label, length = [], [], []
        for batch in task.eval_batches("valid"):
            real = np.asarray(batch.pop("mask")) > 0
            pred.append((np.asarray(apply(params, batch)) > 0)[real])
            label.append(np.asarray(batch["label"])[real] > 0.5)
            length.append(np.full(real.sum(), batch["ids"].shape[1]))
        pred, label, length = map(np.concatenate, (pred, label, length))
        right = pred == label
        print(f"{name}: {len(pred)} reviews, accuracy {100 * right.mean():.2f} %,")
        print(f"  predicted positive {100 * pred.mean():.1f} % (true {100 * label.mean():.1f} %)")
        for size in np.unique(length):
            at = length == size
            print(
                f"  padded length {size}: {at.sum()} reviews, accuracy "
                f"{100 * right[at].mean():.2f} %, predicted positive {100 * pred[at].mean():.1f} %"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
