import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hw2jax.models import bert
from hw2jax.models.gru import params_from_torch
from hw2jax.models.sentiment import BertGRUSentiment
from hw2jax.train.steps import TrainState

TINY_FIELDS = dict(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=20,
    max_position_embeddings=32,
)
TINY = bert.BertConfig(**TINY_FIELDS)


def size(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_bert_base_counts_match_the_assignment():
    model = BertGRUSentiment(bert.BertConfig())
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32)))
    params = params["params"]
    assert size(params) == 112_241_409
    assert size({k: v for k, v in params.items() if k != "bert"}) == 2_759_169
    assert size(params["bert"]) == 109_482_240


def tiny_setup(use_mask=False):
    model = BertGRUSentiment(TINY, hidden_dim=8, use_mask=use_mask)
    ids = jnp.array([[5, 6, 7, 8, 9, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9, 10]])
    params = model.init(jax.random.key(0), ids)["params"]
    return model, params, ids


def test_bert_is_frozen_no_gradient_no_update_no_optimizer_state():
    model, params, ids = tiny_setup()
    # jit: one compile per gradient, not one per op of an eager BERT and GRU.
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, ids).sum()))(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["bert"]))
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads["rnn"]))

    state = TrainState.create(params, optax.adam(1e-2), frozen=("bert",))
    trainable = size({k: v for k, v in params.items() if k != "bert"})
    assert size(state.opt_state) == 2 * trainable + 1  # Adam's mu and nu, and the count
    grads = jax.jit(
        jax.grad(lambda tr: model.apply({"params": {**state.params, **tr}}, ids).sum())
    )(state.trainable())
    new = jax.jit(TrainState.apply_gradients)(state, grads)
    for a, b in zip(
        jax.tree.leaves(params["bert"]), jax.tree.leaves(new.params["bert"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(params["out"]["kernel"], new.params["out"]["kernel"])


def test_faithful_default_sees_padding_and_masking_removes_it():
    model, params, ids = tiny_setup()
    masked = BertGRUSentiment(TINY, hidden_dim=8, use_mask=True)
    more_pad = jnp.concatenate([ids, jnp.zeros((2, 4), jnp.int32)], axis=1)
    # Unmasked (as in the original): extra padding changes the prediction.
    assert not np.allclose(
        model.apply({"params": params}, ids), model.apply({"params": params}, more_pad), atol=1e-6
    )
    # Masked: padding is invisible to BERT and to the GRU.
    np.testing.assert_allclose(
        masked.apply({"params": params}, ids), masked.apply({"params": params}, more_pad), atol=1e-5
    )


def test_bert_dropout_is_on_in_training_by_default():
    model, params, ids = tiny_setup()

    def run(m, seed):
        return m.apply(
            {"params": params},
            ids,
            train=True,
            rngs={"dropout": jax.random.key(seed)},
        )

    no_bert_dropout = BertGRUSentiment(TINY, hidden_dim=8, bert_dropout=False, dropout=0.0)
    assert not np.allclose(run(model, 1), run(model, 2))
    np.testing.assert_allclose(run(no_bert_dropout, 1), run(no_bert_dropout, 2))


def torch_twin(tmp_path, seed, bert_layers=1):
    """The assignment's model in torch with random weights (a transformers BertModel of TINY's
    shape with ``bert_layers`` layers, saved to ``tmp_path``; a 2-layer BiGRU; the linear head),
    and our params copied from it: (tbert, rnn, out, config, params)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    fields = {**TINY_FIELDS, "num_hidden_layers": bert_layers}
    tbert = transformers.BertModel(transformers.BertConfig(**fields)).eval()
    tbert.save_pretrained(tmp_path, safe_serialization=True)
    rnn = torch.nn.GRU(16, 8, num_layers=2, bidirectional=True, batch_first=True, dropout=0.25)
    out = torch.nn.Linear(16, 1)
    config, bert_params, _ = bert.load_pretrained(str(tmp_path))
    params = {
        "bert": bert_params,
        "rnn": params_from_torch(rnn),
        "out": {
            "kernel": jnp.asarray(out.weight.detach().numpy().T),
            "bias": jnp.asarray(out.bias.detach().numpy()),
        },
    }
    return tbert, rnn.eval(), out, config, params


def test_matches_the_assignments_torch_model(tmp_path):
    tbert, rnn, out, config, params = torch_twin(tmp_path, seed=0)
    import torch

    ids = np.array([[5, 6, 7, 8, 9, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():  # the original forward, in eval mode
        embedded = tbert(torch.tensor(ids))[0]
        _, hidden = rnn(embedded)
        expected = out(torch.cat((hidden[-2], hidden[-1]), dim=1)).squeeze(-1).numpy()
    got = BertGRUSentiment(config, hidden_dim=8).apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("pool", ["final", "mean", "max"])
def test_pooled_heads_match_torch(tmp_path, pool, use_mask):
    """Each pooling against torch.nn.GRU with copied weights: masked runs pack the sequences
    (pack_padded_sequence), so the reference sees only the real steps."""
    tbert, rnn, out, config, params = torch_twin(tmp_path, seed=1)
    import torch

    ids = np.array([[5, 6, 7, 8, 9, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9, 10], [7, 3, 0, 0, 0, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    lengths = mask.sum(1)
    with torch.no_grad():
        if use_mask:
            embedded = tbert(torch.tensor(ids), attention_mask=torch.tensor(mask))[0]
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                embedded, torch.tensor(lengths), batch_first=True, enforce_sorted=False
            )
            outputs, hidden = rnn(packed)
            outputs, _ = torch.nn.utils.rnn.pad_packed_sequence(
                outputs, batch_first=True, total_length=ids.shape[1]
            )
            steps = torch.tensor(lengths)
        else:
            outputs, hidden = rnn(tbert(torch.tensor(ids))[0])
            steps = torch.full((len(ids),), ids.shape[1])
        valid = (torch.arange(ids.shape[1])[None, :] < steps[:, None])[..., None]
        pooled = {
            "final": torch.cat((hidden[-2], hidden[-1]), dim=1),
            "mean": (outputs * valid).sum(1) / steps[:, None],
            "max": outputs.masked_fill(~valid, -torch.inf).amax(1),
        }[pool]
        expected = out(pooled).squeeze(-1).numpy()
    model = BertGRUSentiment(config, hidden_dim=8, use_mask=use_mask, pool=pool)
    got = model.apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_an_unknown_pool_names_the_choices():
    with pytest.raises(ValueError, match="pool must be one of"):
        BertGRUSentiment(TINY, pool="sum").init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))


@pytest.mark.parametrize("remat", [False, True])
def test_fine_tuning_gradients_match_torch(tmp_path, remat):
    """One loss (mean binary cross-entropy of the assignment's head on a 2-layer BERT), its
    gradient for every encoder weight against torch's autograd of the transformers twin with
    the same weights; ``remat`` recomputes the layers in the backward pass and must not
    change a number."""
    from hw2jax.models import bert_params as names

    tbert, rnn, out, config, params = torch_twin(tmp_path, seed=3, bert_layers=2)
    import torch

    ids = np.array([[5, 6, 7, 8, 9, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9, 10], [7, 3, 2, 0, 0, 0, 0, 0]])
    labels = np.array([1.0, 0.0, 1.0], np.float32)

    _, hidden = rnn(tbert(torch.tensor(ids))[0])
    logits = out(torch.cat((hidden[-2], hidden[-1]), dim=1)).squeeze(-1)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels)).backward()
    expected = {name: p.grad for name, p in tbert.named_parameters()}

    def loss(p, finetune):
        model = BertGRUSentiment(config, hidden_dim=8, finetune=finetune, remat=remat)
        logits = model.apply({"params": p}, jnp.asarray(ids))
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.asarray(labels)))

    ours = names.state_dict_from_params(jax.grad(loss)(params, True)["bert"])
    compared = 0
    for name, grad in expected.items():
        if grad is None:  # the pooler does not reach the loss
            assert not np.any(ours[name]), name
            continue
        np.testing.assert_allclose(ours[name], grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
        compared += 1
    assert compared == len(expected) - 2  # every weight but the pooler's two
    frozen = jax.grad(loss)(params, False)["bert"]
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(frozen))


def test_layer_wise_learning_rates_scale_each_update():
    from hw2jax.tasks.sentiment.task import layer_decay_scale
    from hw2jax.train.steps import build_optimizer

    scale = lambda path: layer_decay_scale(path, num_layers=3, top_scale=0.1, decay=0.5)  # noqa: E731
    assert scale(("out", "kernel")) == 1.0
    assert scale(("bert", "layer_2", "query", "kernel")) == 0.1
    assert scale(("bert", "layer_0", "query", "kernel")) == 0.1 * 0.5**2
    assert scale(("bert", "embeddings", "word_embeddings", "embedding")) == 0.1 * 0.5**3
    assert scale(("bert", "pooler_dense", "kernel")) == 0.1

    params = {
        "bert": {"layer_0": {"w": jnp.ones((2, 2))}, "embeddings": {"w": jnp.ones((2, 2))}},
        "out": {"w": jnp.ones((2, 2))},
    }
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    import ml_collections

    config = ml_collections.ConfigDict(
        dict(
            epochs=1,
            schedule="constant",
            learning_rate=1e-2,
            optimizer="adamw",
            weight_decay=0.1,  # scaled with the rest, as torch's per-group learning rates do
            grad_clip_norm=0.0,
        )
    )
    plain, layered = build_optimizer(config, 1), build_optimizer(config, 1, scale)
    a, _ = plain.update(grads, plain.init(params), params)
    b, _ = layered.update(grads, layered.init(params), params)
    np.testing.assert_allclose(b["out"]["w"], a["out"]["w"])
    np.testing.assert_allclose(b["bert"]["layer_0"]["w"], 0.1 * 0.5**2 * a["bert"]["layer_0"]["w"])
    np.testing.assert_allclose(b["bert"]["embeddings"]["w"], 0.1 * 0.5**3 * a["out"]["w"])
