"""Fused attention kernels for XLA:CPU, called through ``jax.ffi``: the package's bottom layer
(nothing here imports :mod:`hw2jax.attention` or :mod:`hw2jax.models`).

XLA's CPU backend has no fused attention: it writes the [T, T] scores to memory and reads them
back. The C++ kernels in ``native/`` (one file per kind of op) keep blocks of scores in registers
and cache instead, as torch's CPU SDPA does. By concern:

- :mod:`.build`: compiling the C++ sources for this CPU, caching and loading the library;
- :mod:`.ffi`: the FFI targets as jax functions, :func:`~.ffi.on_mesh`, the one partitioning
  rule of every kernel call on a mesh, and :func:`differentiated_by`, a kernel forward paired
  with another form's gradient;
- :mod:`.softmax`: :func:`cpu_attention` (the row kernel, a key bias, forward only: BERT's; in
  bf16 on AMX tiles, :func:`amx_attention`) and
  :func:`cpu_flash_attention` (causal or not, a key bias, attention dropout; forward and
  backward: BERT's fine-tuning and the long-sequence path), and
  :func:`cpu_few_keys_attention` (many query rows over at most 64 keys that are also the
  values, forward and backward: the ViT's regrouped heads);
- :mod:`.dropout`: attention dropout's counter hash, which the flash kernels compute in C++
  and XLA's form of BERT's attention in jax, so both drop the same entries;
- :mod:`.linear`: :func:`causal_linear_product_cpu` and :func:`linear_attention_cpu`;
- :mod:`.rows`: :func:`cpu_layer_norm`, forward and backward, :func:`cpu_add_layer_norm` and
  :func:`cpu_bias_gelu`;
- :mod:`.matmul`: :func:`amx_matmul` and :func:`amx_batched_matmul`, bf16 products on AMX
  tiles (CPUs with AMX-BF16) or AVX512-BF16 pair dots (CPUs with it and no AMX), and
  :func:`amx_dense`, a bf16 dense layer (bf16 or float32 weights) with its bias, GELU and
  the output's rounding in one call;
- :mod:`.gemm`: :func:`float32_dense`, a float32 dense layer with its bias and GELU in one
  call (forward; differentiated, another form of it runs);
- :mod:`.gru`: :func:`gru_recurrence_cpu`, torch's GRU recurrence over all steps of a layer's
  directions in one call, forward and backward;
- :mod:`.peak`: :func:`fma_peak_gflops`, the float32 rate the cores reach, for benchmarks'
  "achieved against peak".

Whether a kernel is used by default is not decided here: :mod:`hw2jax.attention.dispatch` holds
that rule. Timings: ``benchmarks/cpu_attention_kernel.py``, ``benchmarks/results/cpu_gradients/``.
"""

from hw2jax.kernels import dropout
from hw2jax.kernels.build import (
    SUPPORTED_HEAD_DIMS,
    KernelUnavailable,
    build_error,
    build_march,
    cache_dir,
    cpu_attention_unavailable_reason,
    kernel_vector_features,
    library_path,
    library_target,
    register_targets,
)
from hw2jax.kernels.ffi import differentiated_by
from hw2jax.kernels.gemm import (
    float32_dense,
    float32_dense_unavailable_reason,
    float32_dense_unsupported,
    xla_dense,
)
from hw2jax.kernels.gru import gru_recurrence_cpu, gru_unavailable_reason, gru_unsupported
from hw2jax.kernels.linear import (
    causal_linear_product_cpu,
    causal_linear_unavailable_reason,
    dense_linear_unavailable_reason,
    linear_attention_cpu,
)
from hw2jax.kernels.matmul import (
    amx_batched_matmul,
    amx_dense,
    amx_matmul,
    amx_matmul_unavailable_reason,
    bf16_products_engine,
    bf16_products_unavailable_reason,
)
from hw2jax.kernels.peak import fma_chains, fma_peak_gflops
from hw2jax.kernels.rows import (
    cpu_add_layer_norm,
    cpu_bias_gelu,
    cpu_layer_norm,
    layer_norm_unsupported,
    row_kernel_unavailable_reason,
)
from hw2jax.kernels.softmax import (
    amx_attention,
    cpu_attention,
    cpu_few_keys_attention,
    cpu_flash_attention,
    few_keys_unsupported,
)

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "KernelUnavailable",
    "amx_attention",
    "amx_batched_matmul",
    "amx_dense",
    "amx_matmul",
    "amx_matmul_unavailable_reason",
    "bf16_products_engine",
    "bf16_products_unavailable_reason",
    "build_error",
    "build_march",
    "cache_dir",
    "causal_linear_product_cpu",
    "causal_linear_unavailable_reason",
    "cpu_add_layer_norm",
    "cpu_attention",
    "cpu_attention_unavailable_reason",
    "cpu_bias_gelu",
    "cpu_few_keys_attention",
    "cpu_flash_attention",
    "cpu_layer_norm",
    "dense_linear_unavailable_reason",
    "differentiated_by",
    "dropout",
    "few_keys_unsupported",
    "float32_dense",
    "float32_dense_unavailable_reason",
    "float32_dense_unsupported",
    "fma_chains",
    "fma_peak_gflops",
    "gru_recurrence_cpu",
    "gru_unavailable_reason",
    "gru_unsupported",
    "kernel_vector_features",
    "layer_norm_unsupported",
    "library_path",
    "library_target",
    "linear_attention_cpu",
    "register_targets",
    "row_kernel_unavailable_reason",
    "xla_dense",
]
