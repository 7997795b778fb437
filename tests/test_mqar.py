"""Multi-query associative recall: the data, the model's causality, the task's metrics, learning
and the sweep's resume."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hw2jax.attention import registry
from hw2jax.config import ConfigError, load_config
from hw2jax.data.mqar import make_mqar
from hw2jax.errors import InputError
from hw2jax.models.recall import RecallLM, state_size
from hw2jax.tasks import mqar
from hw2jax.train import hooks

CONFIG = "experiments/mqar.py"


def tiny_config(**changes) -> ml_collections.ConfigDict:
    config = load_config(CONFIG)
    config.update(
        dict(
            epochs=1,
            batch_size=16,
            eval_batch_size=32,
            seq_len=16,
            num_pairs=2,
            vocab_size=16,
            train_size=64,
            test_size=32,
            progress=False,
            log_every_steps=1,
            checkpoint_every_minutes=0.0,
        )
    )
    config.model.update(dict(dim=32, heads=2))
    config.update(changes)
    return config


def test_every_query_asks_for_the_value_paired_with_its_key():
    data = make_mqar(50, seq_len=40, num_pairs=6, vocab_size=64, seed=3)
    for tokens, targets in zip(data["tokens"], data["targets"], strict=True):
        keys, values = tokens[0:12:2], tokens[1:12:2]
        assert len(set(keys)) == 6 and keys.min() >= 1 and keys.max() < 32
        assert values.min() >= 32 and values.max() < 64
        assert np.all(targets[:12] == -1)
        paired = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for token, target in zip(tokens[12:], targets[12:], strict=True):
            assert paired[int(token)] == target


def test_impossible_sizes_are_named():
    with pytest.raises(ValueError, match="leave room for queries"):
        make_mqar(1, seq_len=8, num_pairs=4, vocab_size=64, seed=0)
    with pytest.raises(ValueError, match="use vocab_size >= 22"):
        make_mqar(1, seq_len=64, num_pairs=10, vocab_size=16, seed=0)
    with pytest.raises(InputError, match=r"seq_len 7 gives num_pairs = seq_len // 16 = 0.*1 to 3"):
        mqar.check(tiny_config(seq_len=7, num_pairs=0))
    mqar.check(tiny_config(seq_len=7, num_pairs=3))
    mqar.check(tiny_config(seq_len=16, num_pairs=0))  # one pair
    with pytest.raises(ConfigError, match=r"model\.mixer"):
        mqar.check(tiny_config(model=dict(dim=32, heads=2, depth=2, mixer="mamba")))


@pytest.mark.parametrize("mixer", registry.names(causal=True))
def test_the_model_never_looks_ahead(mixer):
    model = RecallLM(vocab_size=16, dim=32, heads=2, depth=2, mixer=mixer)
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 1, 16)
    params = model.init(jax.random.key(1), tokens)["params"]
    changed = tokens.at[:, 13:].set((tokens[:, 13:] + 5) % 15 + 1)
    before, after = (model.apply({"params": params}, t) for t in (tokens, changed))
    np.testing.assert_allclose(before[:, :13], after[:, :13], rtol=1e-5, atol=1e-5)
    assert not np.allclose(before[:, 13:], after[:, 13:])


def test_state_sizes_follow_their_formulas():
    # Softmax keeps keys and values of every step; the recurrent forms a fixed state.
    assert state_size("softmax", 64, 2, 512) == 2 * 512 * 64
    assert state_size("linear", 64, 2, 512) == 2 * 32 * 33 == state_size("linear", 64, 2, 64)
    assert state_size("gla", 64, 2, 512) == 2 * 32 * 32
    assert state_size("retention", 64, 2, 512) == 2 * 32 * 32
    assert state_size("cosformer", 64, 2, 512) == 2 * 2 * 32 * 33  # its cos and sin halves
    assert state_size("performer", 64, 2, 512) == 2 * 64 * 33  # 2 x head_dim features here
    assert registry.get("performer").floats_per_head(32, 512) == 256 * 33  # the default
    for fixed in ("ssd", "deltanet", "gated_deltanet"):  # a [d, d] state per head
        assert state_size(fixed, 64, 2, 512) == 2 * 32 * 32
    assert state_size("sliding_window", 64, 2, 512) == 2 * 2 * 64 * 32  # the window's cache
    assert state_size("sliding_window", 64, 2, 16) == 2 * 2 * 16 * 32
    assert state_size("based", 64, 2, 512) == 2 * (1 + 32 + 32 * 32) * 33


def test_losses_count_only_the_queries():
    task = mqar.MQARTask(tiny_config())
    targets = jnp.array([[-1, -1, 3, 5], [-1, 4, 4, 4]])
    logits = jax.nn.one_hot(jnp.array([[3, 0, 3, 1], [4, 4, 0, 4]]), 16) * 10.0
    loss, correct = task.losses(logits, {"targets": targets})
    np.testing.assert_allclose(correct, [0.5, 2 / 3])
    # Cross-entropy of a 10-logit margin over 15 others, for each right answer.
    right = -jax.nn.log_softmax(jnp.array([10.0] + [0.0] * 15))[0]
    wrong = -jax.nn.log_softmax(jnp.array([10.0] + [0.0] * 15))[1]
    np.testing.assert_allclose(loss, [(right + wrong) / 2, (2 * right + wrong) / 3], rtol=1e-5)


def test_softmax_attention_learns_to_recall(tmp_path):
    config = tiny_config(epochs=4, train_size=2048, batch_size=32, learning_rate=3e-3)
    history = mqar.train_and_evaluate(config, tmp_path)
    # Chance is 1 in 8 values; the pairs must be read back from the context.
    assert history["epochs"][-1]["test_accuracy"] > 0.9


class StopAfterFirstStep(hooks.Hook):
    def start(self, run):
        run.stop_requested = "a hook"  # as a signal before the first step: it saves and stops


def test_run_each_reads_finished_runs_back_and_times_the_runs_it_trains(tmp_path, monkeypatch):
    """A fake clock and a fake train of 5 s a run; run "b" stops the first time."""
    from hw2jax.train import sweep

    clock, calls = [100.0], []

    def train(config, run_dir):
        calls.append(run_dir.name)
        clock[0] += 5.0
        stops = calls == ["a", "b"]
        history = {"status": "interrupted" if stops else "done", "name": run_dir.name}
        run_dir.mkdir(exist_ok=True)  # a run's work dir and history, as the loop leaves them
        (run_dir / "history.json").write_text(json.dumps(history))
        return history

    monkeypatch.setattr(sweep.time, "perf_counter", lambda: clock[0])
    runs = [(name, ml_collections.ConfigDict()) for name in ("a", "b", "c")]
    first = sweep.run_each(runs, tmp_path, train)
    assert first == [{"status": "done", "name": "a", "wall_time_s": 5.0}]
    assert json.loads((tmp_path / "a" / "history.json").read_text()) == first[0]
    again = sweep.run_each(runs, tmp_path, train)
    assert calls == ["a", "b", "b", "c"]  # "a" read back, "b" trained again, then "c"
    assert [h["name"] for h in again] == ["a", "b", "c"]
    assert [h["wall_time_s"] for h in again] == [5.0, 5.0, 5.0]


def test_the_sweep_resumes_run_by_run_and_writes_table_and_plot(tmp_path, monkeypatch):
    config = tiny_config()
    config.sweep = ml_collections.ConfigDict(
        dict(mixers=("softmax", "linear"), seq_lens=(16,), dims=(32,))
    )
    real = mqar.train_and_evaluate
    calls = []

    def stop_second(run_config, workdir, **kw):
        calls.append(run_config.model.mixer)
        if len(calls) == 2:
            return real(run_config, workdir, extra_hooks=[StopAfterFirstStep()])
        return real(run_config, workdir, **kw)

    monkeypatch.setattr(mqar, "train_and_evaluate", stop_second)
    assert len(mqar.sweep(config, tmp_path)) == 1  # the second run stopped: no table yet
    assert not (tmp_path / "results.md").exists()
    # Resumed with the sweep's list changed (which runs to make, not what one trains): linear
    # resumes from step 1, softmax is read back.
    config.sweep.mixers = ("linear", "softmax")
    rows = mqar.sweep(config, tmp_path)
    assert calls == ["softmax", "linear", "linear"]
    assert [r["mixer"] for r in rows] == ["linear", "softmax"]
    history = json.loads((tmp_path / "linear_T16_d32" / "history.json").read_text())
    assert history["status"] == "done" and history["epochs"][-1]["step"] == 4
    table = (tmp_path / "results.md").read_text()
    assert "| linear | 32 |" in table and "T = 16 (2 pairs)" in table
    assert (tmp_path / "recall_vs_state.png").stat().st_size > 0
