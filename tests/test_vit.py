import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hw2jax import attention, cpu
from hw2jax.models.vit import ViT
from hw2jax.train.steps import build_optimizer

torch = pytest.importorskip("torch")
tnn = torch.nn
from hw2jax.testing import TorchViT  # noqa: E402
from hw2jax.testing import copy_vit_params_to_torch as copy_to_torch  # noqa: E402

ASSIGNMENT = dict(
    image_size=28, patch_size=4, channels=1, dim=64, depth=6, heads=4, dim_head=64, mlp_dim=128
)
SMALL = dict(
    image_size=28, patch_size=7, channels=1, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=24
)
WIDE_HEADS = {**SMALL, "dim_head": 24, "heads": 3}  # dim <= dim_head: merged attention by default


def count(params):
    return sum(x.size for x in jax.tree.leaves(params))


def init(cfg, seed=0, **kw):
    model = ViT(num_classes=10, **cfg, **kw)
    return model, model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))["params"]


def test_assignment_config_has_499722_parameters():
    assert count(init(ASSIGNMENT)[1]) == 499_722


def test_linear_attention_variant_has_the_same_parameters_and_differs():
    model, params = init(ASSIGNMENT)
    linear = ViT(num_classes=10, attention="linear", **ASSIGNMENT)
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    assert count(linear.init(jax.random.key(0), x)["params"]) == 499_722
    out_linear = linear.apply({"params": params}, x)
    assert out_linear.shape == (2, 10) and np.all(np.isfinite(out_linear))
    assert not np.allclose(out_linear, model.apply({"params": params}, x))


def test_bad_shapes_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        init({**ASSIGNMENT, "patch_size": 5})
    model, params = init(SMALL)
    with pytest.raises(ValueError, match="NHWC"):
        model.apply({"params": params}, jnp.zeros((2, 28, 28, 3)))
    with pytest.raises(ValueError, match=r"x\[\.\.\., None\]"):
        model.apply({"params": params}, jnp.zeros((2, 28, 28)))


def torch_params_as_flax_order(tmodel, params, grads: bool = False):
    """Torch parameters (or with ``grads``, their gradients) mapped back onto the Flax tree."""
    out = {}
    flat = dict(tmodel.named_parameters())
    names = {
        "patch_embedding": "patch",
        "cls_token": "cls",
        "pos_embedding": "pos",
        "head_norm": "head_norm",
        "head": "head",
    }
    sub = {
        "norm1": "norm1",
        "norm2": "norm2",
        "to_qkv": "qkv",
        "to_out": "out",
        "fc1": "fc1",
        "fc2": "fc2",
    }
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [k.key for k in path]
        if keys[0].startswith("block"):
            prefix = f"layers.{keys[0][5:]}.{sub[keys[-2]]}"
        elif len(keys) == 1:
            tensor = flat[names[keys[0]]]
            out[tuple(keys)] = (tensor.grad if grads else tensor).detach().numpy()
            continue
        else:
            prefix = names[keys[0]]
        name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[keys[-1]]
        tensor = flat[f"{prefix}.{name}"]
        value = (tensor.grad if grads else tensor).detach().numpy()
        out[tuple(keys)] = value.T if keys[-1] == "kernel" else value
        assert out[tuple(keys)].shape == leaf.shape
    return out


@pytest.mark.parametrize("cfg", [ASSIGNMENT, SMALL], ids=["assignment", "small"])
def test_logits_match_torch(cfg):
    model, params = init(cfg, seed=3)
    tmodel = TorchViT(**cfg)
    copy_to_torch(params, tmodel)
    x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
    ours = model.apply({"params": params}, jnp.asarray(x))
    with torch.no_grad():
        theirs = tmodel(torch.tensor(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("cfg", "merged"),
    [(WIDE_HEADS, None), (WIDE_HEADS, False), (SMALL, True)],
    ids=["wide-auto", "wide-direct", "small-merged"],
)
def test_attention_forms_match_torch_logits_and_gradients(cfg, merged):
    """Both ways of computing attention (regrouped products or q, k, v) against torch."""
    model, params = init(cfg, seed=5, merged_attention=merged)
    tmodel = TorchViT(**cfg)
    copy_to_torch(params, tmodel)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 6)

    def loss_fn(p):
        logits = model.apply({"params": p}, jnp.asarray(x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    tloss = tnn.functional.cross_entropy(
        tmodel(torch.tensor(x).permute(0, 3, 1, 2)), torch.tensor(y)
    )
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
    theirs = torch_params_as_flax_order(tmodel, params, grads=True)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        key = tuple(k.key for k in path)
        np.testing.assert_allclose(g, theirs[key], atol=1e-6, rtol=1e-4, err_msg=str(key))


def _head_transposes(cfg, **kw) -> int:
    """Transposes of 4-d arrays (the [b n h d] <-> [b h n d] copies) in the forward pass."""
    model, params = init(cfg, **kw)
    forward = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))

    def count(jaxpr) -> int:  # nested jaxprs too: custom_vjp functions hold theirs in params
        total = 0
        for e in jaxpr.eqns:
            total += e.primitive.name == "transpose" and e.invars[0].aval.ndim == 4
            for value in e.params.values():
                inner = getattr(value, "jaxpr", value)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    total += count(inner)
        return total

    return count(forward(params, jnp.zeros((2, 28, 28, 1))).jaxpr)


def test_merged_attention_is_chosen_when_dim_le_dim_head(monkeypatch):
    # The direct form's softmax without the fused CPU kernel (which takes [b n h d] as it is and
    # which softmax_attention's auto picks on CPUs with AVX2 or AVX-512): XLA's form, with the
    # transposes.

    monkeypatch.setattr(cpu, "cpu_vector_features", lambda: {"avx2": False, "avx512f": False})
    assert _head_transposes(ASSIGNMENT) == 0  # dim 64 = dim_head 64
    assert _head_transposes(ASSIGNMENT, merged_attention=False) > 0
    assert _head_transposes(SMALL) > 0  # dim 16 > dim_head 8: the direct form has fewer FLOPs
    assert _head_transposes(ASSIGNMENT, attention="linear") > 0  # linear needs q, k, v


def _adam_steps_against_torch(
    optimizer: str, weight_decay: float = 1e-4, check_grads: bool = True
) -> float:
    """Three steps of ours and of torch's Adam(lr=1e-3, weight_decay=1e-4) from the same
    weights and batches; returns the largest parameter difference at the end. Each step checks
    that the gradients agree, then gives torch's gradient to both optimisers: Adam divides by
    sqrt(v), so float32 rounding in a tiny gradient can move a parameter by a sizeable part of
    lr, which would blur the comparison of the optimisers themselves."""
    model, params = init(SMALL, seed=4)
    tmodel = TorchViT(**SMALL)
    copy_to_torch(params, tmodel)
    config = ml_collections.ConfigDict(
        dict(
            epochs=1,
            learning_rate=1e-3,
            optimizer=optimizer,
            weight_decay=weight_decay,
            schedule="constant",
            warmup_epochs=0.0,
            grad_clip_norm=0.0,
        )
    )
    tx = build_optimizer(config, steps_per_epoch=3)
    opt_state = tx.init(params)
    topt = torch.optim.Adam(tmodel.parameters(), lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(1)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [tuple(k.key for k in path) for path, _ in leaves]
    for _ in range(3):
        x = rng.normal(size=(8, 28, 28, 1)).astype(np.float32)
        y = rng.integers(0, 10, 8)

        def loss_fn(p, x=x, y=y):
            logits = model.apply({"params": p}, jnp.asarray(x))
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

        ours = jax.tree_util.tree_leaves(jax.grad(loss_fn)(params))
        topt.zero_grad()
        tnn.functional.cross_entropy(
            tmodel(torch.tensor(x).permute(0, 3, 1, 2)), torch.tensor(y)
        ).backward()
        theirs = torch_params_as_flax_order(tmodel, params, grads=True)
        for key, g in zip(keys, ours, strict=True):
            if check_grads:
                np.testing.assert_allclose(g, theirs[key], atol=1e-6, rtol=1e-4, err_msg=str(key))
        same = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(theirs[k]) for k in keys])
        updates, opt_state = tx.update(same, opt_state, params)
        params = optax.apply_updates(params, updates)
        topt.step()
    theirs = torch_params_as_flax_order(tmodel, params)
    final = dict(zip(keys, jax.tree_util.tree_leaves(params), strict=True))
    return max(float(np.abs(np.asarray(p) - theirs[k]).max()) for k, p in final.items())


def test_adam_l2_steps_match_torch_adam_weight_decay():
    # Float32 rounding only: a few ulps of parameters near 1 (LayerNorm scales).
    assert _adam_steps_against_torch("adam_l2") < 1e-6
    # The same check tells coupled L2 from decoupled decay (AdamW), and from no decay at all:
    # both are off by about 5e-3 after 3 steps.
    assert _adam_steps_against_torch("adamw", check_grads=False) > 1e-4
    assert _adam_steps_against_torch("adam_l2", weight_decay=0.0, check_grads=False) > 1e-4


def _strong_recipe_steps(mask_vectors=True):
    """Six steps of the strong recipe's optimiser (AdamW, decay on matrices only, warm-up then
    cosine, global-norm clipping) and of torch's AdamW + LambdaLR + clip_grad_norm_ on the same
    gradients; the largest parameter difference at the end."""
    config = ml_collections.ConfigDict(
        dict(
            epochs=3,
            learning_rate=1e-2,
            optimizer="adamw",
            weight_decay=0.05,
            schedule="warmup_cosine",
            warmup_epochs=1.0,
            grad_clip_norm=1.0,
        )
    )
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    tx = build_optimizer(config, steps_per_epoch=2)
    state = tx.init(params)
    tparams = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    groups = [
        {"params": [tparams["w"]]},
        {"params": [tparams["b"]], "weight_decay": 0.0 if mask_vectors else 0.05},
    ]
    topt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05, eps=1e-8)
    warmup, total = 2, 6  # steps: 1 epoch of warm-up, 3 epochs of 2 steps

    def factor(t):  # the learning rate of step t (from 0) over the peak
        if t < warmup:
            return t / warmup
        return 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(topt, factor)
    for _ in range(total):
        grads = {k: 3 * rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0)  # norms of about 10: clipped
        topt.step()
        schedule.step()
    return max(
        float(np.abs(np.asarray(params[k]) - t.detach().numpy()).max()) for k, t in tparams.items()
    )


def test_the_strong_recipes_optimizer_steps_as_torchs_adamw_schedule_and_clipping():
    assert _strong_recipe_steps() < 1e-6
    # The same check tells decay on the vectors too from none there.
    assert _strong_recipe_steps(mask_vectors=False) > 1e-4


def test_label_smoothing_is_torchs():
    """The ViT task's loss with label_smoothing=0.1: torch's cross_entropy(label_smoothing=0.1)
    on the same logits, per example; and with 0, plain cross entropy."""
    from types import SimpleNamespace

    from hw2jax.tasks import vit as vit_task

    rng = np.random.default_rng(3)
    logits = (3 * rng.standard_normal((16, 10))).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    for smoothing in (0.1, 0.0):
        task = SimpleNamespace(
            config=ml_collections.ConfigDict({"label_smoothing": smoothing}), num_classes=10
        )
        loss, correct = vit_task.ViTTask.losses(
            task, jnp.asarray(logits), {"label": jnp.asarray(labels)}
        )
        want = tnn.functional.cross_entropy(
            torch.tensor(logits), torch.tensor(labels), label_smoothing=smoothing, reduction="none"
        )
        np.testing.assert_allclose(loss, want.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(correct, logits.argmax(-1) == labels)


@pytest.mark.parametrize("kind", ["softmax", "linear", "performer", "cosformer", "retention"])
def test_every_bidirectional_attention_runs_in_the_vit_and_learns(kind):
    """One Adam step on a batch lowers its loss with every attention the ViT accepts."""
    model, params = init(SMALL, seed=1, attention=kind)
    x = jax.random.normal(jax.random.key(2), (8, 28, 28, 1))
    y = jnp.arange(8) % 10

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), y
        ).mean()

    tx = optax.adam(3e-3)
    before, grads = jax.value_and_grad(loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert bool(jnp.isfinite(before)) and loss(optax.apply_updates(params, updates)) < before


def test_vit_retention_is_the_symmetric_decay_formula():

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 6, 3, 4)) for i in range(3))
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(3))
    ref = np.zeros((2, 6, 3, 4))
    for i in range(6):
        for j in range(6):
            w = np.einsum("bhd,bhd->bh", qn[:, i], kn[:, j]) / 2.0 * gamma ** abs(i - j)
            ref[:, i] += w[..., None] * vn[:, j]
    np.testing.assert_allclose(
        attention.bidirectional_retention(q, k, v), ref, rtol=1e-5, atol=1e-5
    )


def test_gla_in_the_vit_is_refused_with_the_reason(tmp_path, capsys):
    from pathlib import Path

    from hw2jax import cli

    config = Path(__file__).parents[1] / "experiments" / "vit_fashion_mnist.py"
    args = ["vit", "train", "--config", str(config), "--workdir", str(tmp_path / "w")]
    assert cli.main([*args, "--attention", "gla"]) == 2
    err = capsys.readouterr().err
    assert "causal recurrence" in err and "use retention" in err
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="causal recurrence"):
        ViT(attention="gla").init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
