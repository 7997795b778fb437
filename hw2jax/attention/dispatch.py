"""The one rule that picks how attention runs when the caller says ``implementation="auto"``.

Softmax attention (:func:`~hw2jax.attention.softmax_attention`), linear attention
(:func:`~hw2jax.attention.linear_attention` and the feature-map variants that share its
products) and BERT's key-bias attention (:func:`~hw2jax.attention.key_bias_attention`, which
:class:`hw2jax.models.bert.BertModel` calls) all ask this module, with one vocabulary: a path is
named by its ``implementation=`` string, and the same name means the same code everywhere. The
row kernels (:func:`row_kernel`), bf16 products (:func:`dense_product`), the GRU's recurrence
(:func:`recurrence`) and a model's ``"auto"`` compute dtype (:func:`precision`) ask it too.

The rule, in order:

1. **GPU or TPU**: the paths that have been measured there. Softmax: ``"jax"``, i.e.
   ``jax.nn.dot_product_attention`` with no implementation named (JAX's own choice of cuDNN or
   XLA). Linear: ``"chunked"``. Key bias, few keys and the GRU's recurrence: ``"xla"``. Our
   Pallas kernels run only when asked for by name (``"pallas"``).
2. **CPU where the fused kernels can run** (:mod:`hw2jax.kernels`: float32, head dims a multiple
   of 16 up to 128, a C++ compiler) **and their build has AVX2 or AVX-512**: the fused kernels.
   Their tiles are sized to the build's registers; built for AVX2 they took 0.32-0.83x the time
   of XLA's forms, with XLA and torch held to AVX2 too
   (``benchmarks/results/zen4/attention_avx2_build/``). For softmax the forward pass
   alone takes the row kernel (non-causal, below 2^26 scores per (batch, head)), blockwise (non-
   causal, from there) or the flash kernel (causal); gradients take the flash kernel from 2^16
   scores on, ``"naive"`` below (``benchmarks/results/cpu_gradients/``). Linear: ``"fused_cpu"``.
   Key bias: ``"fused_cpu"`` (the row kernel forward; the flash kernels, with dropout, for
   gradients). Few keys (the ViT's regrouped heads, float32, at most 64 keys):
   ``"fused_cpu"``. The GRU's recurrence (float32, hidden size a multiple of 16): ``"fused_cpu"``.
3. **Any other CPU** (no AVX2: another ISA, or an older x86): softmax ``"naive"`` below 2^26 scores
   per (batch, head) and ``"blockwise"`` from there (O(T) memory); linear ``"chunked"``; key bias,
   few keys and the GRU's recurrence ``"xla"``.

Before all three, linear attention with Based's Taylor feature map takes ``"parallel"`` (its
weights from the scores, no features) wherever the keys are fewer than its 1 + d + d^2
features (:func:`taylor_parallel`): a count of flops and bytes, the same on every machine.

**Measured on CPU.** Vector features do not predict speed on every CPU, so on a CPU the rule's
candidates are timed once per machine and shape class, and the fastest is taken
(:func:`fastest`). A shape class is the operation, causal or not, forward or forward and
backward, the scores per (batch, head) and the batch x heads rows (each to a power of two),
the head dim and the dtype. Each class is timed on first use, on inputs of its size (batch
and heads cut to at most 2^24 scores in all, but not below one row per core; T beyond 8,192
timed at 8,192), and cached
next to the kernel build, in a file keyed by the CPU, the compiler, jax and the kernels'
source (:func:`hw2jax.kernels.library_target`); delete it to time again. "With gradients"
means a path's outputs and their gradients, as a training step computes them
(:func:`probe_program`). A class's paths compile together, on the usable cores, then run
in turns, run by run: the best of up to three runs after a warm-up, a path already past twice
another's best (and 5 ms) run no more, and all of them once more where their times overturn
the feature rule (:func:`time_paths`). A class timed while other processes took over a
tenth of this process's cores (:func:`hw2jax.cpu.others_busy`) is timed again by the next
process, each path keeping its best, up to :data:`LOADED_TIMINGS` timings so taken. At most
20 s of timing per
process; classes left untimed then take the feature rule, as they do where another process
has held the cache's lock for over :data:`LOCK_WAIT_S`. Softmax and BERT's key-bias
attention time forward and gradient separately (a custom VJP runs the forward winner when
nothing is differentiated; key bias with attention dropout is a class of its own); linear and
few-keys attention are timed with gradients. The row
kernels (:func:`row_kernel`: layer norms, timed with gradients; BERT's bias + GELU and its
float32 dense products, forward) share the probe, their class being the operation, the rows to
a power of two (timed on at most 2^14), the width (a product's K x N) and the dtype; so do
bf16 dense layers (:func:`dense_product`: the product kernel or XLA's dot, timed forward as the
layer runs them and, apart, the product with its output and both gradients kept, the class
naming the program's XLA options; :func:`hw2jax.models.layers.measured_dense` joins the two
winners as softmax does). The
GRU's recurrence (:func:`recurrence`: the fused kernel or
a ``lax.scan``) is timed with gradients over at most :data:`PROBE_STEPS` steps, its class being
the directions, the batch to a power of two, the hidden size and the dtype. A model's compute
dtype (:func:`precision`) is timed as one of its layers in float32 and in bf16, the layer's own
classes timed as it compiles. Processes of a
multi-process run all take the feature rule, so that they compile one program.

``HW2JAX_ATTENTION`` (e.g. ``HW2JAX_ATTENTION=xla``) forces one softmax and key-bias path for the
whole process, where that path applies; ``auto`` or unset leaves the rule above.
``HW2JAX_RECURRENCE`` (``xla`` or ``fused_cpu``) does the same for the GRU's recurrence.
``HW2JAX_AUTO=rule`` keeps the feature rule without timing anything (the tests do, so that no
test depends on timings); ``measure`` (the default) times as above.

:class:`Machine` is everything the rule reads about where it runs; tests pass a made-up one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import fcntl
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import cpu, kernels
from hw2jax.errors import InputError

SOFTMAX = ("auto", "jax", "xla", "cudnn", "pallas", "blockwise", "naive", "fused_cpu")
LINEAR = ("auto", "chunked", "recurrent", "pallas", "fused_cpu", "parallel")
KEY_BIAS = ("auto", "xla", "fused_cpu")
FEW_KEYS = ("auto", "xla", "fused_cpu")
MATMUL = ("auto", "xla", "amx")
RECURRENCE = ("auto", "xla", "fused_cpu")
RECURRENCE_ENV = "HW2JAX_RECURRENCE"
# The compute dtypes precision() chooses between, float32 first: it stays on a tie.
PRECISIONS = ("float32", "bfloat16")
# A recurrence is timed over at most this many steps: its cost per step does not change with T.
PROBE_STEPS = 64

# From this many scores per (batch, head) on (T = 8192), softmax without gradients goes
# blockwise on CPU and the fused forward takes the flash kernel (the row kernel's rows leave
# the caches).
BLOCKWISE_FROM = 2**26
# From this many scores per (batch, head) on (T = 256), gradients on CPU take the fused flash
# kernel where it can run; shorter inputs, such as the ViT's 50 patches, keep naive's program.
FUSED_GRADIENTS_FROM = 2**16
FORCE_ENV = "HW2JAX_ATTENTION"
MATMUL_ENV = "HW2JAX_MATMUL"
ROW_KERNELS = ("auto", "xla", "fused_cpu")
ROW_KERNELS_ENV = "HW2JAX_ROW_KERNELS"
# Below this many multiply-adds a product stays with XLA: packing and the call cost more than
# the tiles save (benchmarks/results/amx_matmul/).
AMX_MIN_MACS = 2**20
AUTO_ENV = "HW2JAX_AUTO"
PROBE_BUDGET_S = 20.0
# How long a process waits for another to finish timing a class before it gives up timing.
LOCK_WAIT_S = 120.0
# How a probe times (probe_program). Cached timings taken another way are timed again: before
# it, a path's gradients were timed without its outputs, which XLA's paths could skip.
PROBE_METHOD = "outputs and gradients"
# Batch and heads are cut until batch x heads x scores is at most this: tens of ms per path.
PROBE_SCORES = 2**24
# Longer inputs (T = 8,192 and up) are timed at this many scores and share its class: at
# T = 16,384 one call with gradients takes seconds, and the O(T)-memory paths left there keep
# their order as T grows.
PROBE_MAX_SCORES = 2**26
# Row-wise operations (layer norms, BERT's bias + GELU) are timed on at most this many rows.
PROBE_ROWS = 2**14
# The rule's path keeps its place unless another is faster by more than this fraction of its
# time and by more than TIE_MS: a tiny class's timings swing by more than its paths differ (the
# ViT's layer norm on 256 class tokens, kernel against XLA's form, on one 2-core Zen 4 EPYC:
# 0.098 / 0.103, 0.070 / 0.116 and 0.155 / 0.083 ms in three probes; on the AMX Xeon 0.148 /
# 0.134 one day and 0.178 / 0.064 the next, which at 0.1 ms flipped `make run` to 88.55 %),
# and the paths differ in rounding, so a near tie would change a run's numbers from one probe
# to the next for no speed (0.25 ms a call is 0.1 % of that ViT's step).
TIE_FRACTION = 0.05
TIE_MS = 0.25
# A path whose run took over LOSING_FACTOR times another path's best, and over LOSING_MIN_MS,
# is run no more: such runs strayed at most 1.34x from their path's best (the first after the
# warm-up, over six runs of the fine-tuning steps' 34 paths on the 2-core AMX Xeon,
# benchmarks/results/amx_xeon/probe_compile/); shorter runs strayed up to 2.14x, and cost
# little to repeat.
LOSING_FACTOR = 2.0
LOSING_MIN_MS = 5.0
# A class timed while other processes took over LOADED_SHARE of this process's cores is timed
# again by later processes, each path keeping its best, until a timing runs without such load
# or LOADED_TIMINGS have run with it: load slows paths unevenly (a core busy half the time
# slowed the flash kernel more than XLA's naive form on the 2-core Zen 4, which then read
# faster, benchmarks/results/zen4/probe_in_turns/), and the cache keeps a class's choice for
# good. Idle, classes read 0 to 0.10 (benchmarks/results/zen4/loaded_probe/), loaded 0.11 to
# 0.48; a false alarm costs a timing in a later run.
LOADED_SHARE = 0.1
LOADED_TIMINGS = 3
# Why the fused CPU kernels cannot run on some inputs (None: they can), asked lazily.
Reason = Callable[[], "str | None"]


class ImplementationError(InputError):
    """An ``implementation=`` that is unknown, or that cannot run for these inputs here."""


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the rule reads: jax's backend, whether the device is an NVIDIA GPU, and the vector
    features the fused CPU kernels are built for."""

    backend: str
    nvidia: bool = False
    kernel_features: tuple[tuple[str, bool], ...] = ()

    @property
    def fused_cpu_pays_off(self) -> bool:
        features = dict(self.kernel_features)
        return self.backend == "cpu" and (
            features.get("avx2", False) or features.get("avx512f", False)
        )

    @property
    def amx(self) -> bool:
        return self.backend == "cpu" and dict(self.kernel_features).get("amx_bf16", False)

    @property
    def bf16_products(self) -> bool:
        """The bf16 product kernel runs here: on AMX tiles, or on AVX512-BF16 pair dots."""
        features = dict(self.kernel_features)
        return self.backend == "cpu" and (
            features.get("amx_bf16", False) or features.get("avx512_bf16", False)
        )


def this_machine() -> Machine:
    backend = jax.default_backend()
    nvidia = backend == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower()
    features: tuple = ()
    if backend == "cpu":
        try:
            features = tuple(sorted(kernels.kernel_vector_features().items()))
        except kernels.KernelUnavailable:  # no compiler: the kernels cannot run anyway
            features = ()
    return Machine(backend, nvidia, features)


def check(implementation: str, choices: tuple[str, ...], what: str) -> None:
    if implementation not in choices:
        raise ImplementationError(
            f"unknown implementation {implementation!r} for {what}; use one of "
            f"{', '.join(choices)}."
        )


def resolve_fused(
    implementation: str,
    choices: tuple[str, ...],
    what: str,
    reason: Reason,
    auto: Callable[[], str],
    instead: str = "implementation='auto' or 'xla'",
) -> str:
    """``implementation`` checked against ``choices`` (``what`` names the caller): ``auto()`` for
    ``"auto"``, else the name given; ``"fused_cpu"`` where its kernel cannot run (``reason()``
    says why) is an error naming the way out, ``instead``."""
    check(implementation, choices, what)
    if implementation == "auto":
        return auto()
    if implementation == "fused_cpu":
        refuse_if_cannot_run(implementation, reason(), instead)
    return implementation


def refuse_if_cannot_run(implementation: str, why: str | None, instead: str) -> None:
    """The error for an ``implementation=`` that cannot run here (``why`` says why; None: it
    can), naming what to use ``instead``."""
    if why is not None:
        raise ImplementationError(
            f"implementation={implementation!r} cannot run: {why}. Use {instead}."
        )


def _forced_by(variable: str, choices: tuple[str, ...]) -> str | None:
    """The path ``$variable`` forces, checked against ``choices``; None for auto (unset, empty
    or ``auto``)."""
    value = os.environ.get(variable, "auto") or "auto"
    check(value, choices, f"${variable}")
    return None if value == "auto" else value


def forced(choices: tuple[str, ...]) -> str | None:
    """The path ``$HW2JAX_ATTENTION`` forces, if it names one of ``choices`` other than auto."""
    value = os.environ.get(FORCE_ENV, "auto") or "auto"
    return value if value != "auto" and value in choices else None


def softmax(
    scores: int,
    causal: bool,
    fused_reason: Reason,
    machine: Machine | None = None,
    measure: Measure | None = None,
) -> str | tuple[str, str]:
    """The softmax path for ``scores`` = T_q * T_k per (batch, head). ``fused_reason()`` says why
    the fused CPU kernels cannot run on these inputs (None: they can); it is called only where
    the rule would take them, since asking builds the kernels. Returns a path's name, or the
    form that runs when nothing is differentiated and the one whose gradient is taken ("row"
    and "flash" name the fused kernels' forms). ``measure``: the call's inputs and paths, for
    timing on CPU (:func:`fastest`); None keeps the feature rule."""
    machine = machine or this_machine()
    force = forced(SOFTMAX)
    if force and not (force == "fused_cpu" and fused_reason()):
        return force
    if machine.backend != "cpu":
        return "jax"
    measured = measure is not None and measuring(machine)
    # Asking builds the kernels: only where they would be timed or taken.
    fused = (measured or machine.fused_cpu_pays_off) and fused_reason() is None
    forward, gradient = _softmax_rule(scores, causal, machine.fused_cpu_pays_off and fused)
    if measured:
        fits = scores < BLOCKWISE_FROM  # naive's T x T scores are held in memory
        kernels = ["row", "flash"] if not causal and fits else ["flash"]
        paths = kernels * fused + ["naive"] * fits + ["blockwise"]
        grad_paths = ["flash"] * fused + ["naive"] * fits + ["blockwise"]
        timed = (
            fastest("softmax", causal, False, paths, measure, forward),
            fastest("softmax", causal, True, grad_paths, measure, gradient),
        )
        if all(timed):
            forward, gradient = timed
    # One of XLA's forms both ways needs no custom VJP between.
    return forward if forward == gradient != "flash" else (forward, gradient)


def _softmax_rule(scores: int, causal: bool, fused: bool) -> tuple[str, str]:
    """The feature rule's forward and gradient paths: the fused kernels where they pay off."""
    if fused:
        forward = "flash" if causal else "row" if scores < BLOCKWISE_FROM else "blockwise"
        return forward, "flash" if scores >= FUSED_GRADIENTS_FROM else "naive"
    xla = "blockwise" if scores >= BLOCKWISE_FROM else "naive"
    return xla, xla


def linear(
    fused_reason: Reason,
    machine: Machine | None = None,
    measure: Measure | None = None,
    causal: bool = False,
) -> str:
    """The linear-attention path: ``"fused_cpu"`` or ``"chunked"``, timed with gradients where
    ``measure`` is given on CPU."""
    return _fused_or_xla(
        "linear", True, None, fused_reason, machine, measure, causal=causal, xla="chunked"
    )


def taylor_parallel(keys: int, head_dim: int) -> bool:
    """Whether linear attention with Based's Taylor feature map takes the parallel form, its
    weights 1 + s + s^2 / 2 computed from the T_q x T_k scores, on any backend: when the keys are
    fewer than its 1 + d + d^2 features. Per (batch, head) the parallel form then costs less in
    flops (T_q T_k (d + d_v) against (T_q + T_k) (1 + d + d^2) d_v) and in memory (T_q T_k
    weights against (T_q + T_k) (1 + d + d^2) features); at a ViT's 50 tokens and head dim 64
    q's features alone would be 83 times the scores."""
    return keys < 1 + head_dim + head_dim**2


def key_bias(
    fused_reason: Reason,
    machine: Machine | None = None,
    measure: Measure | None = None,
    dropout: bool = False,
) -> str | tuple[str, str]:
    """BERT's attention paths, ``"fused_cpu"`` or ``"xla"``: the one that runs when nothing is
    differentiated (timed forward only where ``measure`` is given on CPU) and the one whose
    gradient is taken (timed with gradients); one name where they agree. ``dropout``: the call
    drops probabilities, timed as a class of its own."""
    op = "key_bias dropout" if dropout else "key_bias"
    force = forced(KEY_BIAS)
    forward, gradient = (
        _fused_or_xla(op, g, force, fused_reason, machine, measure) for g in (False, True)
    )
    return forward if forward == gradient else (forward, gradient)


def few_keys(
    fused_reason: Reason, machine: Machine | None = None, measure: Measure | None = None
) -> str:
    """The path of :func:`~hw2jax.attention.few_keys.few_keys_attention` (the ViT's regrouped
    heads): ``"fused_cpu"`` or ``"xla"``, timed with gradients where ``measure`` is given on
    CPU, else the fused kernel where the fused kernels pay off."""
    return _fused_or_xla("few_keys", True, forced(FEW_KEYS), fused_reason, machine, measure)


def _fused_or_xla(
    op: str,
    gradient: bool,
    force: str | None,
    fused_reason: Reason,
    machine: Machine | None,
    measure: Measure | None,
    causal: bool = False,
    xla: str = "xla",
) -> str:
    """``"fused_cpu"`` or XLA's form (named ``xla``) for an operation with one fused CPU
    kernel: ``force`` (an environment variable's path, None for auto) where it can run, timed
    (with gradients or not) where ``measure`` is given on CPU, else the kernel where the fused
    kernels pay off."""
    machine = machine or this_machine()
    if force and not (force == "fused_cpu" and fused_reason()):
        return force
    measured = measure is not None and measuring(machine)
    # Asking builds the kernels: only where they would be timed or taken.
    fused = (measured or machine.fused_cpu_pays_off) and fused_reason() is None
    rule = "fused_cpu" if machine.fused_cpu_pays_off and fused else xla
    if measured and fused:
        return fastest(op, causal, gradient, ["fused_cpu", xla], measure, rule) or rule
    return rule


def row_kernel(
    unsupported: Reason,
    machine: Machine | None = None,
    measure: Measure | None = None,
    op: str = "rows",
    gradient: bool = False,
) -> str:
    """How a row-wise operation with a CPU kernel runs (:mod:`hw2jax.kernels.rows`: a layer
    norm over the last axis, one pass each way, and BERT's GELU(x + bias) on all threads;
    :mod:`hw2jax.kernels.gemm`: BERT's float32 dense layers, each row of x by the weights):
    ``"fused_cpu"`` or ``"xla"`` (flax's or jax's). ``unsupported()`` says why the kernel
    cannot take the input here (None: it can). Timed as ``op`` (with gradients or not) where
    ``measure`` is given on CPU, else the kernel where the fused kernels pay off (AVX2 or
    AVX-512). ``$HW2JAX_ROW_KERNELS`` (``auto``, ``xla`` or ``fused_cpu``) forces one path where
    it can run."""
    force = _forced_by(ROW_KERNELS_ENV, ROW_KERNELS)
    return _fused_or_xla(op, gradient, force, unsupported, machine, measure)


def recurrence(
    unsupported: Reason, machine: Machine | None = None, measure: Measure | None = None
) -> str:
    """How the GRU's recurrence runs (:class:`hw2jax.models.gru.GRU`): ``"fused_cpu"``
    (:func:`hw2jax.kernels.gru_recurrence_cpu`, all steps in one call) or ``"xla"`` (a
    ``lax.scan``). ``unsupported()`` says why the kernel cannot take the input here (None: it
    can). Timed with gradients where ``measure`` is given on CPU, else the kernel where the fused
    kernels pay off (AVX2 or AVX-512). ``$HW2JAX_RECURRENCE`` (``auto``, ``xla`` or
    ``fused_cpu``) forces one path where it can run."""
    force = _forced_by(RECURRENCE_ENV, RECURRENCE)
    return _fused_or_xla("gru", True, force, unsupported, machine, measure)


def dense_product(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    amx_reason: Reason,
    machine: Machine | None = None,
    measure: Callable[[], Measure] | None = None,
    gradient: bool = True,
) -> str:
    """How a dense layer's product ``lhs @ rhs`` runs: ``"amx"`` (:func:`hw2jax.kernels.
    amx_matmul`) or ``"xla"``. The kernel takes bf16 products of a Dense layer's form (lhs's
    last axis against a 2-D rhs's first) of at least ``AMX_MIN_MACS`` multiply-adds, on a CPU
    with AMX-BF16 (on the tiles) or AVX512-BF16 (on pair dot products), on one device or a mesh
    (each device multiplies its rows). Whole bf16 steps gained 1.2-1.45x on the tiles, though
    single products range from 0.7x to 2x XLA's (benchmarks/results/amx_matmul/), and 1.1x on
    the Zen 4 EPYC's pair dots (benchmarks/results/zen4/pair_dots/). Where the rule takes the
    kernel and ``measure`` is given on a CPU that measures, ``measure()``'s two paths are
    timed (class ``bf16_dense``), with ``gradient`` the output and both gradients, else
    forward, and the faster taken: XLA's bf16 dot may run on the tiles too (YNNPACK), and
    on pair dot products one path may win forward and the other with gradients
    (benchmarks/results/amx_xeon/no_amx_refused/bf16_forward_class/).
    ``$HW2JAX_MATMUL`` (``auto``, ``xla`` or ``amx``) forces one path: ``amx`` sends every bf16
    product of that form to the kernel, whatever its size, and is an error where the kernel
    cannot run."""
    contracting, batch = dimension_numbers
    fits = (
        lhs.dtype == rhs.dtype == jnp.bfloat16
        and rhs.ndim == 2
        and tuple(contracting[0]) == (lhs.ndim - 1,)
        and tuple(contracting[1]) == (0,)
        and not batch[0]
        and not batch[1]
    )
    path = _amx_or_xla(fits, math.prod(lhs.shape) * rhs.shape[-1], amx_reason, machine)
    if path != "amx" or measure is None or _forced_by(MATMUL_ENV, MATMUL):
        return path
    if not measuring(machine or this_machine()):
        return path
    return fastest("bf16_dense", False, gradient, ["amx", "xla"], measure(), "amx") or path


def batched_product(
    a: jax.Array,
    b: jax.Array,
    transpose_a: bool,
    transpose_b: bool,
    amx_reason: Reason,
    machine: Machine | None = None,
) -> str:
    """How a batched product op(a) @ op(b) of two [B, ., .] arrays runs (the ViT's regrouped
    attention has two): ``"amx"`` (:func:`hw2jax.kernels.amx_batched_matmul`) or ``"xla"``, by
    :func:`dense_product`'s rule and ``$HW2JAX_MATMUL``; a and b transposed both stay XLA's."""
    fits = (
        a.dtype == b.dtype == jnp.bfloat16
        and a.ndim == b.ndim == 3
        and not (transpose_a and transpose_b)
    )
    macs = math.prod(a.shape) * (b.shape[1] if transpose_b else b.shape[2]) if fits else 0
    return _amx_or_xla(fits, macs, amx_reason, machine)


def bf16_row_attention(
    shape: tuple, dtype, amx_reason: Reason, machine: Machine | None = None
) -> str:
    """How the fused row kernel (BERT's attention) takes q, k, v of ``shape`` [B, T, heads, D]
    and ``dtype``: ``"amx"`` (:func:`hw2jax.kernels.amx_attention`: bf16 on the tiles) or
    ``"float32"`` (upcast, :func:`hw2jax.kernels.cpu_attention`). bf16 inputs take the tiles by
    :func:`dense_product`'s rule (a CPU with AMX-BF16, ``AMX_MIN_MACS``) and
    ``$HW2JAX_MATMUL``: MiniLM's attention took 19.5 ms a call there against 24.6 upcast
    (benchmarks/results/amx_fused/)."""
    batch, t, heads, dim = shape
    fits = jnp.dtype(dtype) == jnp.bfloat16 and dim in kernels.SUPPORTED_HEAD_DIMS
    path = _amx_or_xla(fits, 2 * batch * heads * t * t * dim, amx_reason, machine, tiles=True)
    return "amx" if path == "amx" else "float32"


def bf16_products_on_amx(amx_reason: Reason, machine: Machine | None = None) -> bool:
    """Whether large bf16 products run on AMX tiles here (:func:`dense_product`'s rule for a
    product of its form and size, ``$HW2JAX_MATMUL`` included; ``amx_reason`` says why the
    tiles cannot run): what a step's other XLA options may depend on."""
    return _amx_or_xla(True, AMX_MIN_MACS, amx_reason, machine, tiles=True) == "amx"


def _amx_or_xla(
    fits: bool, macs: int, amx_reason: Reason, machine: Machine | None, tiles: bool = False
) -> str:
    """The kernel for a product of its form (``fits``): forced by ``$HW2JAX_MATMUL=amx``, else
    from ``AMX_MIN_MACS`` multiply-adds on a CPU where it runs (with ``tiles``, AMX-BF16 only:
    BERT's bf16 attention has no pair-dot form; forced where the tiles cannot run, it stays
    off them while the products take the pair dots)."""
    force = _forced_by(MATMUL_ENV, MATMUL)
    if force == "xla" or not fits:
        return "xla"
    if force == "amx":
        if (why := amx_reason()) is None:
            return "amx"
        if tiles:
            return "xla"
        raise ImplementationError(
            f"${MATMUL_ENV}=amx, but the bf16 product kernel cannot run here: {why}. Unset "
            f"{MATMUL_ENV} or set it to auto."
        )
    machine = machine or this_machine()
    on_cpu = machine.amx if tiles else machine.bf16_products
    if macs >= AMX_MIN_MACS and on_cpu and amx_reason() is None:
        return "amx"
    return "xla"


def precision(
    rule: str,
    measure: Callable[[], Measure],
    gradient: bool,
    machine: Machine | None = None,
    op: str = "precision",
) -> tuple[str, dict[str, float] | None]:
    """The compute dtype a model's ``"auto"`` takes, "bfloat16" or "float32", and the
    milliseconds that decided it (None: not timed). On a CPU that measures, ``measure()``'s
    programs (a path per dtype, with gradients or not) are timed once per machine and class,
    and bf16 is taken only where it is faster than float32 beyond the tie (:func:`choose`):
    at the same speed float32 rounds less. Elsewhere (a GPU or TPU, ``HW2JAX_AUTO=rule``, a
    multi-process run, the budget spent) ``rule``, the vector-feature rule's answer, stands.
    The features alone mislead here: with AMX held back, a stand-in for a Xeon with
    AVX512-BF16 and no AMX, MiniLM's fine-tuning step ran 1.18-1.24x faster in float32
    (benchmarks/results/amx_xeon/precision_auto/)."""
    machine = machine or this_machine()
    if not measuring(machine):
        return rule, None
    timed = measure()
    choice = fastest(op, False, gradient, PRECISIONS, timed, "float32")
    if choice is None:
        return rule, None
    return choice, state.timings[_class_of(op, False, gradient, timed)]["ms"]


# Timing the candidates ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measure:
    """One call's inputs (only their shapes and dtypes are read; [batch, T, heads, dim] first,
    keys second) and ``run(path)``: the function of such inputs that computes the call's
    result by that path."""

    inputs: Sequence[jax.Array]
    run: Callable[[str], Callable[..., object]]
    # For operations of other layouts: the class's size in words (the cache key's tail), and
    # the inputs to time on.
    size: str | None = None
    probe: Sequence[jax.ShapeDtypeStruct] | None = None
    # XLA options of the program the call runs in (as ``jax.jit(compiler_options=...)``), or
    # a function of the path giving them: its paths are timed compiled as that program compiles
    # them.
    compiler_options: tuple[tuple[str, str], ...] | Callable[[str], dict] = ()
    # With gradients, the last probe input is the cotangent of ``run(path)``'s output: the
    # program returns the output and the other inputs' gradients, each kept, as a training
    # step keeps them. A summed loss lets XLA fold a product into its sum and never write it.
    cotangent: bool = False

    def options(self, path: str) -> dict:
        """The XLA options that ``path``'s program compiles with."""
        options = self.compiler_options
        return dict(options(path) if callable(options) else options)


_RULE_ONLY = contextvars.ContextVar("hw2jax_dispatch_rule_only", default=False)
_TAKEN: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "hw2jax_dispatch_taken", default=None
)


@contextlib.contextmanager
def recording():
    """Yields a dict that collects, while inside, each shape class auto decides by its timings
    (cached or timed now) and what it took: ``{class: {"path": ..., "ms": {path: ms}}}``. A
    training run keeps it beside its machine, so that two runs' paths can be compared. Inside
    another recording, the outer one's dict (a task's choices before its loop join the loop's)."""
    if (outer := _TAKEN.get()) is not None:
        yield outer
        return
    taken: dict[str, dict] = {}
    token = _TAKEN.set(taken)
    try:
        yield taken
    finally:
        _TAKEN.reset(token)


@contextlib.contextmanager
def rule_only():
    """Inside, auto takes the feature rule and times nothing: for calls whose results do not
    depend on the path, such as a model's init on a dummy batch of one, a shape class that
    training never meets and whose timing would only spend the probe's budget."""
    token = _RULE_ONLY.set(True)
    try:
        yield
    finally:
        _RULE_ONLY.reset(token)


def auto_mode() -> str:
    """``$HW2JAX_AUTO`` as set (``measure`` where unset); :func:`measuring` checks it."""
    return os.environ.get(AUTO_ENV) or "measure"


def measuring(machine: Machine) -> bool:
    """Whether auto times its candidates here: ``$HW2JAX_AUTO`` is ``measure`` (the default), on
    a CPU, in a single-process run, outside :func:`rule_only`."""
    mode = auto_mode()
    if mode not in ("measure", "rule"):
        raise ImplementationError(
            f"${AUTO_ENV}={mode!r} is not a mode; set it to 'measure' (time the paths once per "
            "machine, the default) or 'rule' (pick by vector features, timing nothing)."
        )
    if _RULE_ONLY.get():
        return False
    return mode == "measure" and machine.backend == "cpu" and jax.process_count() == 1


def shape_class(op: str, causal: bool, gradient: bool, inputs: Sequence[jax.Array]) -> str:
    """The cache's key for one call: calls with the same key share one timing."""
    if len(inputs[0].shape) != 4:  # a row-wise operation: x [..., C] and per-column vectors
        rows, width = math.prod(inputs[0].shape[:-1]), inputs[0].shape[-1]
        return (
            f"{op} {'fwd+bwd' if gradient else 'fwd'} rows 2^{int(math.log2(max(rows, 1)))} "
            f"width {width} {jnp.dtype(inputs[0].dtype).name}"
        )
    b, t_q, heads, d = inputs[0].shape
    scores, rows = min(t_q * inputs[1].shape[1], PROBE_MAX_SCORES), b * heads
    return (
        f"{op} {'causal' if causal else 'full'} {'fwd+bwd' if gradient else 'fwd'} "
        f"scores 2^{int(math.log2(scores))} rows 2^{int(math.log2(rows))} "
        f"d {d}x{inputs[2].shape[-1]} {jnp.dtype(inputs[0].dtype).name}"
    )


@dataclasses.dataclass
class ProbeState:
    """This process's view of the cache file, and the seconds it has spent timing."""

    timings: dict[str, dict] = dataclasses.field(default_factory=dict)
    seconds_spent: float = 0.0
    said_rule_stands: bool = False  # told the user that untimed classes now take the rule
    timed_here: set[str] = dataclasses.field(default_factory=set)  # classes this process timed
    said_loaded: bool = False  # told the user that a class was timed beside other work


state = ProbeState()


def fastest(
    op: str,
    causal: bool,
    gradient: bool,
    paths: Sequence[str],
    measure: Measure,
    rule: str | None = None,
) -> str | None:
    """The fastest of ``paths`` for this call's shape class (by :func:`choose`, ``rule`` the
    path the feature rule would take): from the cache, else timed now (in a thread of its own,
    since this runs while jax traces the caller). None once this process has spent
    :data:`PROBE_BUDGET_S` timing, or where nothing can be cached."""
    if len(paths) == 1:
        return paths[0]
    key = _class_of(op, causal, gradient, measure)
    choice = _cached_choice(key, paths, rule) or _timed_choice(key, paths, measure, gradient, rule)
    if choice is not None and (taken := _TAKEN.get()) is not None:
        taken[key] = {"path": choice, "ms": state.timings[key]["ms"]}
    return choice


def _timed_choice(
    key: str, paths: Sequence[str], measure: Measure, gradient: bool, rule: str | None
) -> str | None:
    """:func:`fastest`'s choice for a class not in this process's view of the cache: read from
    the file, else timed now."""
    if (path := cache_file()) is None:
        return None
    if state.seconds_spent >= PROBE_BUDGET_S:
        if choice := _cached_choice(key, paths, rule, loaded_too=True):
            return choice  # timed beside other work: a later run times it again
        if not state.said_rule_stands:
            state.said_rule_stands = True
            print(
                f"auto: this process has spent its {PROBE_BUDGET_S:.0f} s of timing; the shape "
                f"classes it has not timed ({key} first) take the vector-feature rule here, "
                "and a later run times them.",
                flush=True,
            )
        return None
    try:
        return time_class(path, key, paths, measure, gradient, rule)
    except _LockBusy as busy:
        # The rest of this process keeps the rule rather than wait on each class again.
        state.seconds_spent = PROBE_BUDGET_S
        state.said_rule_stands = True
        print(
            f"auto: another process has held {busy} for over {LOCK_WAIT_S:.0f} s; this "
            "process takes the vector-feature rule for the shape classes not yet timed "
            "(HW2JAX_AUTO=rule does so from the start).",
            flush=True,
        )
        return _cached_choice(key, paths, rule, loaded_too=True)


def time_class(
    path: Path, key: str, paths: Sequence[str], measure: Measure, gradient: bool, rule: str | None
) -> str | None:
    """Times the shape class ``key`` under the cache's lock (unless another process cached it
    meanwhile), writes it to the cache file at ``path`` and returns :func:`choose`'s path."""
    with _locked(path):  # one process times a class; the others then read its result
        state.timings.update(_read(path))
        if choice := _cached_choice(key, paths, rule):
            return choice
        start, spent = time.perf_counter(), state.seconds_spent
        with cpu.others_busy() as load, concurrent.futures.ThreadPoolExecutor(1) as thread:
            seconds = thread.submit(time_paths, paths, measure, gradient, rule=rule).result()
        # Classes timed inside this one (a layer's own paths, while it compiles) count once.
        state.seconds_spent = spent + time.perf_counter() - start
        record = {
            "ms": {name: round(ms, 3) for name, ms in _ms(seconds).items()},
            "probe_shapes": [list(x.shape) for x in _probe_of(measure, abstract=True)],
            "date": time.strftime("%Y-%m-%d"),
            "method": PROBE_METHOD,
            "others_busy_share": None if load["share"] is None else round(load["share"], 2),
        }
        state.timings[key] = _with_earlier(record, state.timings.get(key))
        state.timed_here.add(key)
        _write(path, state.timings)
    if timed_beside_load(state.timings[key]) and not state.said_loaded:
        state.said_loaded = True
        print(
            f"auto: other processes took {100 * load['share']:.0f} % of this process's cores "
            f"while it timed {key}; this run takes the path that timing chose, and later runs "
            f"time such classes again (up to {LOADED_TIMINGS} timings beside other work) "
            "before the cache keeps them.",
            flush=True,
        )
    return _cached_choice(key, paths, rule)


def timed_beside_load(record: dict) -> bool:
    """Whether a cached class's last timing ran while other processes took over
    :data:`LOADED_SHARE` of this process's cores (:data:`LOADED_TIMINGS`)."""
    share = record.get("others_busy_share")
    return share is not None and share > LOADED_SHARE


def times_again(record: dict) -> bool:
    """Whether another process times this cached class again: its last timing ran beside other
    work (:func:`timed_beside_load`), and fewer than :data:`LOADED_TIMINGS` so."""
    return timed_beside_load(record) and record.get("loaded_timings", 1) < LOADED_TIMINGS


def _with_earlier(record: dict, earlier: dict | None) -> dict:
    """A class's new ``record``, each path keeping its best of this timing and of an ``earlier``
    one taken beside other work (load only adds time), counting the timings so taken."""
    loaded = int(timed_beside_load(record))
    if earlier is None or not timed_beside_load(earlier) or earlier.get("method") != PROBE_METHOD:
        return {**record, "loaded_timings": loaded}
    before = earlier.get("ms", {})
    ms = {name: min(t, before.get(name, math.inf)) for name, t in record["ms"].items()}
    return {**record, "ms": ms, "loaded_timings": earlier.get("loaded_timings", 1) + loaded}


def timings() -> dict:
    """What auto measured: each shape class this process timed or read from the cache, with
    each path's milliseconds (benchmark records keep it beside their figures)."""
    return {"cache_file": str(cache_file()), "classes": copy.deepcopy(state.timings)}


def within_tie(slower_ms: float, faster_ms: float) -> bool:
    """Whether the faster path saves no more than :data:`TIE_FRACTION` of the slower's time or
    :data:`TIE_MS`: too little for a probe to tell them apart."""
    return slower_ms - faster_ms <= max(TIE_FRACTION * slower_ms, TIE_MS)


def choose(ms: dict[str, float], paths: Sequence[str], rule: str | None = None) -> str:
    """The path of ``paths`` to take given their milliseconds: the fastest, but ``rule``'s
    where the two are :func:`within_tie`."""
    best = min(paths, key=lambda name: ms[name])
    if rule in paths and within_tie(ms[rule], ms[best]):
        return rule
    return best


def _cached_choice(
    key: str, paths: Sequence[str], rule: str | None, loaded_too: bool = False
) -> str | None:
    """The cached record's choice; None where the class is to be timed (again): not cached,
    timed another way, or last timed by another process beside other work, fewer than
    :data:`LOADED_TIMINGS` times so (unless ``loaded_too``: nothing will time it now)."""
    record = state.timings.get(key, {})
    if record.get("method") != PROBE_METHOD:  # timed another way: time it again
        return None
    ms = record.get("ms", {})
    if not all(name in ms for name in paths):
        return None
    if times_again(record) and key not in state.timed_here and not loaded_too:
        return None
    return choose(ms, paths, rule)


def probe_inputs(inputs: Sequence[jax.Array], abstract: bool = False) -> list:
    """Inputs of the call's shapes and dtypes, with T halved until the scores are at most
    :data:`PROBE_MAX_SCORES`, then batch and heads cut until batch x heads x scores is at most
    :data:`PROBE_SCORES`, but never below one row per core. Values in [0, 1): positive, as
    feature maps' are."""
    if len(inputs[0].shape) != 4:  # rows: x [..., C] flattened, cut to PROBE_ROWS rows
        rows = min(math.prod(inputs[0].shape[:-1]), PROBE_ROWS)
        shapes = [(rows, inputs[0].shape[-1]), *(x.shape for x in inputs[1:])]
    else:
        shapes = _attention_probe_shapes(inputs)
    probe = [jax.ShapeDtypeStruct(s, x.dtype) for s, x in zip(shapes, inputs, strict=True)]
    return probe if abstract else _filled(probe)


def _filled(probe: Sequence[jax.ShapeDtypeStruct]) -> list:
    """Arrays of these shapes and dtypes, values in [0, 1), the same on every call."""
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.random(x.shape), x.dtype) for x in probe]


def _attention_probe_shapes(inputs: Sequence[jax.Array]) -> list[tuple]:
    b, t_q, heads = inputs[0].shape[:3]
    t_k = inputs[1].shape[1]
    while t_q * t_k > PROBE_MAX_SCORES:
        t_q, t_k = -(-t_q // 2), -(-t_k // 2)
    scores = t_q * t_k
    # The fused kernels spread (batch, head) rows over the cores: fewer rows than cores would
    # time them on part of the machine.
    floor = min(b * heads, cpu.usable_cores())
    while b > 1 and b * heads * scores > PROBE_SCORES and (b + 1) // 2 * heads >= floor:
        b = (b + 1) // 2
    while heads > 1 and b * heads * scores > PROBE_SCORES and b * ((heads + 1) // 2) >= floor:
        heads = (heads + 1) // 2
    return [
        (b, t_q if i == 0 else t_k, heads, *x.shape[3:]) if x.ndim == 4 else (b, t_k)
        for i, x in enumerate(inputs)
    ]


def _class_of(op: str, causal: bool, gradient: bool, measure: Measure) -> str:
    if measure.size is None:
        return shape_class(op, causal, gradient, measure.inputs)
    return f"{op} {'fwd+bwd' if gradient else 'fwd'} {measure.size}"


def _probe_of(measure: Measure, abstract: bool = False) -> list:
    if measure.probe is None:
        return probe_inputs(measure.inputs, abstract)
    return list(measure.probe) if abstract else _filled(measure.probe)


def time_paths(
    paths: Sequence[str], measure: Measure, gradient: bool, rule: str | None = None
) -> dict[str, float]:
    """Each path's best time on the probe's inputs. The paths' programs are
    traced one after the other (tracing a layer may time classes of its own), compiled at once
    on the usable cores (XLA compiles a program on about one core: the probe's compilations
    take most of its budget), then run in turns with nothing else running (:func:`best_times`).
    Where their times overturn ``rule`` (the feature rule's path) the paths run once more, each
    keeping its best of both: the cache keeps a class's choice for good, and one slow reading
    once sent a class to its slower path (benchmarks/results/zen4/avx2_quick_tiles/)."""
    inputs = _probe_of(measure)
    lowered = [
        jax.jit(
            probe_program(measure.run(name), gradient, len(inputs), measure.cotangent),
            compiler_options=measure.options(name) or None,
        ).lower(*inputs)
        for name in paths
    ]
    with concurrent.futures.ThreadPoolExecutor(min(len(paths), cpu.usable_cores())) as pool:
        compiled = list(pool.map(lambda program: program.compile(), lowered))
    programs = dict(zip(paths, compiled, strict=True))
    seconds = best_times(programs, inputs)
    if rule in seconds and choose(_ms(seconds), paths, rule) != rule:
        again = best_times(programs, inputs)
        seconds = {name: min(s, again[name]) for name, s in seconds.items()}
    return seconds


def _ms(seconds: dict[str, float]) -> dict[str, float]:
    return {name: s * 1e3 for name, s in seconds.items()}


def probe_program(fn: Callable, gradient: bool, operands: int, cotangent: bool = False) -> Callable:
    """What the probe times of a path: ``fn``, or with ``gradient`` the sum of its outputs and
    the gradients of its first three inputs (q, k, v; a row operation's inputs). The sum keeps
    the outputs computed, as a training step needs them: from the gradients alone XLA drops
    the products whose values no gradient needs (attention's P v), and its path would be timed
    doing less work than the kernel's. With ``cotangent`` the last input is the output's
    cotangent, and the program returns the output and the other inputs' gradients."""
    if not gradient:
        return fn
    if cotangent:

        def output_and_gradients(*args):
            out, pullback = jax.vjp(fn, *args[:-1])
            return out, pullback(args[-1])

        return output_and_gradients

    def loss(*args):
        return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(fn(*args)))

    return jax.value_and_grad(loss, argnums=tuple(range(min(3, operands))))


def best_times(programs: dict[str, Callable], inputs: list) -> dict[str, float]:
    """Each program's best of up to three runs (half a second of its runs at most) after one
    that warms it up, the programs taking turns run by run (a b, b a, a b): a slow patch of the
    machine a few runs long then slows every path's runs alike, where one path's runs after
    another's would each fall inside it (this Zen 4 guest slowed calls up to 2x for seconds,
    benchmarks/NOTES.md). After each round a program whose best is over :data:`LOSING_FACTOR`
    times another's best and over :data:`LOSING_MIN_MS` is run no more, whichever ran first:
    it cannot win, and its repeats would spend the budget on the probe's slowest runs."""
    for program in programs.values():
        jax.block_until_ready(program(*inputs))
    best = dict.fromkeys(programs, math.inf)
    spent = dict.fromkeys(programs, 0.0)

    def runs_again(name: str) -> bool:
        rivals = min((best[other] for other in programs if other != name), default=math.inf)
        lost = best[name] > max(LOSING_FACTOR * rivals, LOSING_MIN_MS / 1e3)
        return spent[name] <= 0.5 and not lost

    running = list(programs)
    for round_ in range(3):
        shift = round_ % len(running)
        for name in running[shift:] + running[:shift]:
            began = time.perf_counter()
            jax.block_until_ready(programs[name](*inputs))
            took = time.perf_counter() - began
            best[name], spent[name] = min(best[name], took), spent[name] + took
        if not (running := [name for name in running if runs_again(name)]):
            break
    return best


def restart_budget() -> None:
    """Gives this process a fresh :data:`PROBE_BUDGET_S`, as a new process has: for benchmarks
    that run in one process what would be runs of their own. The classes this process timed
    stay timed: one timed beside other work is timed again by the next process, not by a later
    row of this one, which would most likely share the load and spend its
    :data:`LOADED_TIMINGS` before an idle process could."""
    state.seconds_spent = 0.0
    state.said_rule_stands = False


@functools.cache
def cache_file() -> Path | None:
    """Beside the kernel build, under the build's key (CPU, compiler, jax, kernel source) and
    the cores this process may use (on fewer cores, under ``taskset`` or a container's cpuset,
    the paths rank otherwise); None without a compiler, where only XLA's paths exist and the
    rule stands. Found once per process, as the build itself is: the key asks the compiler for
    its version."""
    try:
        target = kernels.library_target()
    except kernels.KernelUnavailable:
        return None
    stem = target.stem.replace("cpu_attention", "dispatch")
    return target.with_name(f"{stem}-{cpu.usable_cores()}-cores.json")


# Whether this process holds the cache's lock: a class timed while another is (the paths of a
# layer being timed make their own choices as they compile) takes it as held.
_lock_held = False


@contextlib.contextmanager
def _locked(path: Path):
    global _lock_held
    if _lock_held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        _wait_for(lock, path)
        _lock_held = True
        try:
            yield
        finally:
            _lock_held = False
            fcntl.flock(lock, fcntl.LOCK_UN)


class _LockBusy(Exception):
    """Another process held the cache's lock past :data:`LOCK_WAIT_S`."""


def _wait_for(lock, path: Path) -> None:
    """Takes ``lock`` (the cache's lock file), waiting at most :data:`LOCK_WAIT_S`: a process
    times a class in seconds, so one holding it longer is stopped or stuck."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise _LockBusy(path.with_suffix(".lock")) from None
            time.sleep(0.05)


def _read(path: Path) -> dict:
    """The cached timings; a damaged or foreign file counts as empty (it is only a cache)."""
    try:
        timings = json.loads(path.read_text()).get("classes", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return timings if isinstance(timings, dict) else {}


def cached_timings(path: Path) -> dict[str, dict]:
    """The classes timed on this machine, from the cache file at ``path`` (:func:`cache_file`),
    for ``hw2jax machine``: each with its paths' milliseconds (``ms``)."""
    timed = _read(path)
    return {k: v for k, v in timed.items() if isinstance(v, dict) and isinstance(v.get("ms"), dict)}


def _write(path: Path, timings: dict) -> None:
    unkeyed = ("date", "env", "commit")  # the cache is keyed by the kernel build, not by these
    record = {"machine": {k: v for k, v in cpu.machine().items() if k not in unkeyed}}
    record["classes"] = timings
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(f.name, path)
