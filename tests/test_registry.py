"""The attention registry: every variant registered once, read by the ViT, MQAR, the CLI and the
benchmarks; a researcher's variant from outside the package through a config file."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hw2jax import cli
from hw2jax.attention import registry
from hw2jax.models.recall import state_size

EXTENSIONS = Path(__file__).parent / "extensions"
SMALL_VIT = ["model.patch_size=7", "model.dim=16", "model.depth=2", "model.heads=2"]
SMALL_VIT += ["model.dim_head=8", "model.mlp_dim=24", "batch_size=32", "eval_batch_size=40"]
TINY_MQAR = ["seq_len=16", "num_pairs=2", "vocab_size=16", "train_size=64", "test_size=32"]
TINY_MQAR += ["batch_size=16", "eval_batch_size=32", "model.dim=32", "model.heads=2"]


def _uniform():
    """The extension's variant, registered as a config file would (importing its module)."""
    spec = importlib.util.spec_from_file_location(
        "uniform_attention", EXTENSIONS / "uniform_attention.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return registry.get("uniform")


def _uniform_reference(v: np.ndarray, causal: bool) -> np.ndarray:
    """float64, a plain loop: each query's mean of the values it sees."""
    v = np.asarray(v, np.float64)
    out = np.zeros_like(v)
    for i in range(v.shape[1]):
        out[:, i] = v[:, : i + 1].mean(1) if causal else v.mean(1)
    return out


def test_the_packages_variants_are_registered_with_their_forms():
    assert registry.names()[:6] == (
        "softmax",
        "linear",
        "performer",
        "cosformer",
        "retention",
        "gla",
    )
    assert registry.names()[6:11] == (
        "ssd",
        "deltanet",
        "gated_deltanet",
        "sliding_window",
        "based",
    )
    assert "gla" not in registry.names(bidirectional=True)
    assert set(registry.names(bidirectional=True)) >= {"based"}
    assert not {"ssd", "deltanet", "gated_deltanet", "sliding_window"} & set(
        registry.names(bidirectional=True)
    )
    assert set(registry.names(causal=True)) >= {"softmax", "gla", "retention"}
    with pytest.raises(registry.VariantError, match=r"no bidirectional.*causal recurrence"):
        registry.get("gla").bind(causal=False)
    with pytest.raises(registry.VariantError, match=r"unknown attention 'mamba'.*register"):
        registry.get("mamba")


def test_options_are_checked_against_their_schema():
    linear = registry.get("linear")
    with pytest.raises(registry.VariantError, match="feature_map: got 'tanh'; choose one of"):
        linear.bind(causal=True, feature_map="tanh")
    with pytest.raises(registry.VariantError, match="num_features: expected int"):
        registry.get("performer").bind(causal=False, num_features=2.5)
    with pytest.raises(registry.VariantError, match="takes no option window"):
        linear.bind(causal=False, window=3)
    with pytest.raises(registry.VariantError, match="unknown gates"):
        registry.register("broken", lambda q, k, v, *, causal: v, gates=("beta_squared",))
    assert "broken" not in registry.names()


def test_a_variant_of_ones_own_is_one_function_and_one_registration():
    uniform = _uniform()
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 7, 3, 4)) for i in range(3))
    for causal in (False, True):
        got = uniform.bind(causal=causal)(q, k, v)
        np.testing.assert_allclose(got, _uniform_reference(v, causal), rtol=1e-6, atol=1e-6)
    doubled = uniform.bind(causal=True, weight=2)(q, k, v)  # an int option where float: cast
    np.testing.assert_allclose(doubled, 2 * _uniform_reference(v, True), rtol=1e-6, atol=1e-6)
    # MQAR's state sizes come from the registration: 2 heads of (16 + 1) floats.
    assert state_size("uniform", dim=32, heads=2, seq_len=64) == 2 * 17
    assert "uniform" in registry.names(bidirectional=True)


def test_a_config_file_brings_its_own_variant_to_the_vit(fashion_dir, tmp_path, capsys):
    args = ["vit", "train", "--config", str(EXTENSIONS / "vit_uniform.py")]
    args += ["--workdir", str(tmp_path / "vit"), "--data-dir", str(fashion_dir), "--epochs", "1"]
    for item in [*SMALL_VIT, "progress=False"]:
        args += ["--set", item]
    assert cli.main(args) == 0
    history = json.loads((tmp_path / "vit" / "history.json").read_text())
    assert history["status"] == "done" and history["config"]["model"]["attention"] == "uniform"
    # The registered function itself ran, in its bidirectional form.
    assert registry.get("uniform").fn.calls and not any(registry.get("uniform").fn.calls)


def test_a_config_file_brings_its_own_variant_to_mqar(tmp_path):
    args = ["mqar", "train", "--config", str(EXTENSIONS / "mqar_uniform.py")]
    args += ["--workdir", str(tmp_path / "mqar"), "--epochs", "1"]
    for item in [*TINY_MQAR, "progress=False", "checkpoint_every_minutes=0.0"]:
        args += ["--set", item]
    assert cli.main(args) == 0
    history = json.loads((tmp_path / "mqar" / "history.json").read_text())
    assert history["status"] == "done" and history["config"]["model"]["mixer"] == "uniform"
    assert all(registry.get("uniform").fn.calls)  # causal, as a language model needs


def test_the_cli_and_the_benchmarks_read_the_registry(capsys):
    _uniform()
    with pytest.raises(SystemExit):
        cli.main(["vit", "train", "--help"])
    assert "uniform" in " ".join(capsys.readouterr().out.split())
    from test_benchmarks import bench as attention_scaling

    rows = {impl.name: impl for impl in attention_scaling.all_impls()}
    assert rows["hw2jax uniform"].causal == (False, True)
    assert rows["hw2jax gla"].causal == (True,)
    q = k = v = jnp.ones((1, 8, 2, 16))
    out = rows["hw2jax uniform"].build(True)(q, k, v)
    np.testing.assert_allclose(out, 1.0)
