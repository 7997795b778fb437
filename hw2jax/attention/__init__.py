"""Parts 2 and 3 and the attention variants: weightless self-attention, softmax attention and
the linear-time families.

One module per form: :mod:`.self_attention`, :mod:`.softmax`, :mod:`.blockwise`, :mod:`.linear`,
:mod:`.decay` (retention, gated linear attention), :mod:`.delta_rule` (DeltaNet, Gated
DeltaNet), :mod:`.sliding_window`, :mod:`.kernelized` (cosFormer, Performer), :mod:`.key_bias`
(BERT's, with dropout by :mod:`hw2jax.kernels.dropout`'s hash, which the kernels share),
:mod:`.few_keys` (the ViT's regrouped heads) and :mod:`.helpers` for the checks and matmuls they
share. Two modules decide: :mod:`.dispatch` (which path ``implementation="auto"`` takes) and
:mod:`.registry` (the variants that models, the CLI and the benchmarks offer). Layouts follow
``jax.nn.dot_product_attention``: q, k, v are ``[batch, T, heads, head_dim]``; the value
head_dim may differ from the query/key one.
"""

from hw2jax.attention import dispatch, registry
from hw2jax.attention.blockwise import blockwise_softmax_attention
from hw2jax.attention.decay import (
    bidirectional_retention,
    gated_linear_attention,
    retention,
    retention_decays,
)
from hw2jax.attention.delta_rule import delta_rule_attention
from hw2jax.attention.few_keys import few_keys_attention
from hw2jax.attention.helpers import matmul_f32
from hw2jax.attention.kernelized import (
    cosformer_attention,
    performer_attention,
    performer_features,
    performer_projection,
)
from hw2jax.attention.key_bias import key_bias_attention
from hw2jax.attention.linear import FEATURE_MAPS, NonPositiveDenominatorWarning, linear_attention
from hw2jax.attention.self_attention import self_attention, self_attention_weights
from hw2jax.attention.sliding_window import sliding_window_attention
from hw2jax.attention.softmax import softmax_attention

__all__ = [
    "FEATURE_MAPS",
    "NonPositiveDenominatorWarning",
    "bidirectional_retention",
    "blockwise_softmax_attention",
    "cosformer_attention",
    "delta_rule_attention",
    "dispatch",
    "dropout",
    "few_keys_attention",
    "gated_linear_attention",
    "key_bias_attention",
    "linear_attention",
    "matmul_f32",
    "performer_attention",
    "performer_features",
    "performer_projection",
    "registry",
    "retention",
    "retention_decays",
    "self_attention",
    "self_attention_weights",
    "sliding_window_attention",
    "softmax_attention",
]
