"""The one rule that picks how attention runs when the caller says ``implementation="auto"``.

Softmax attention (:func:`~hw2jax.attention.softmax_attention`), linear attention
(:func:`~hw2jax.attention.linear_attention` and the feature-map variants that share its
products) and BERT's key-bias attention (:func:`~hw2jax.attention.key_bias_attention`, which
:class:`hw2jax.models.bert.BertModel` calls) all ask this module, with one vocabulary: a path is
named by its ``implementation=`` string, and the same name means the same code everywhere.

The rule, in order:

1. **GPU or TPU**: the paths that have been measured there. Softmax: ``"jax"``, i.e.
   ``jax.nn.dot_product_attention`` with no implementation named (JAX's own choice of cuDNN or
   XLA). Linear: ``"chunked"``. Key bias: ``"xla"``. Our Pallas kernels run only when asked for
   by name (``"pallas"``).
2. **CPU where the fused kernels can run** (:mod:`hw2jax.kernels`: float32, head dims a multiple
   of 16 up to 128, a C++ compiler) **and their build has AVX-512**: the fused kernels. Built for
   AVX2 alone their 8 x 32 score tile spills out of the 16 ymm registers and XLA is faster
   (``benchmarks/NOTES.md``, "The fused kernel without AVX-512"). For softmax the forward pass
   alone takes the row kernel (non-causal, below 2^26 scores per (batch, head)), blockwise (non-
   causal, from there) or the flash kernel (causal); gradients take the flash kernel from 2^16
   scores on, ``"naive"`` below (``benchmarks/results/cpu_gradients/``). Linear: ``"fused_cpu"``.
   Key bias: ``"fused_cpu"`` unless attention dropout is active (the kernel keeps no
   probabilities).
3. **Any other CPU**: softmax ``"naive"`` below 2^26 scores per (batch, head) and
   ``"blockwise"`` from there (O(T) memory); linear ``"chunked"``; key bias ``"xla"``.

``HW2JAX_ATTENTION`` (e.g. ``HW2JAX_ATTENTION=xla``) forces one softmax and key-bias path for the
whole process, where that path applies; ``auto`` or unset leaves the rule above.

:class:`Machine` is everything the rule reads about where it runs; tests pass a made-up one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax

from hw2jax import kernels
from hw2jax.errors import InputError

SOFTMAX = ("auto", "jax", "xla", "cudnn", "pallas", "blockwise", "naive", "fused_cpu")
LINEAR = ("auto", "chunked", "recurrent", "pallas", "fused_cpu")
KEY_BIAS = ("auto", "xla", "fused_cpu")

# From this many scores per (batch, head) on (T = 8192), softmax without gradients goes
# blockwise on CPU and the fused forward takes the flash kernel (the row kernel's rows leave
# the caches).
BLOCKWISE_FROM = 2**26
# From this many scores per (batch, head) on (T = 256), gradients on CPU take the fused flash
# kernel where it can run; shorter inputs, such as the ViT's 50 patches, keep naive's program.
FUSED_GRADIENTS_FROM = 2**16
FORCE_ENV = "HW2JAX_ATTENTION"
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
        return self.backend == "cpu" and dict(self.kernel_features).get("avx512f", False)


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


def forced(choices: tuple[str, ...]) -> str | None:
    """The path ``$HW2JAX_ATTENTION`` forces, if it names one of ``choices`` other than auto."""
    value = os.environ.get(FORCE_ENV, "auto") or "auto"
    return value if value != "auto" and value in choices else None


def softmax(
    scores: int, causal: bool, fused_reason: Reason, machine: Machine | None = None
) -> str | tuple[str, str]:
    """The softmax path for ``scores`` = T_q * T_k per (batch, head). ``fused_reason()`` says why
    the fused CPU kernels cannot run on these inputs (None: they can); it is called only where
    the rule would take them, since asking builds the kernels. Returns a path's name, or for the
    fused kernels (forward, gradient): the form that runs when nothing is differentiated
    ("row", "flash" or "blockwise"), and the one whose gradient is taken."""
    machine = machine or this_machine()
    force = forced(SOFTMAX)
    if force and not (force == "fused_cpu" and fused_reason()):
        return force
    if machine.backend != "cpu":
        return "jax"
    if machine.fused_cpu_pays_off and fused_reason() is None:
        forward = "flash" if causal else "row" if scores < BLOCKWISE_FROM else "blockwise"
        return forward, "flash" if scores >= FUSED_GRADIENTS_FROM else "naive"
    return "blockwise" if scores >= BLOCKWISE_FROM else "naive"


def linear(fused_reason: Reason, machine: Machine | None = None) -> str:
    """The linear-attention path: ``"fused_cpu"`` or ``"chunked"``."""
    machine = machine or this_machine()
    return "fused_cpu" if machine.fused_cpu_pays_off and fused_reason() is None else "chunked"


def key_bias(fused_reason: Reason, machine: Machine | None = None) -> str:
    """BERT's attention path: ``"fused_cpu"`` or ``"xla"``. ``fused_reason()`` covers attention
    dropout too (the kernel keeps no probabilities)."""
    machine = machine or this_machine()
    force = forced(KEY_BIAS)
    if force and not (force == "fused_cpu" and fused_reason()):
        return force
    return "fused_cpu" if machine.fused_cpu_pays_off and fused_reason() is None else "xla"
