"""The attention variants, registered once each: everything that offers a choice of attention
(the ViT's ``attention=``, the MQAR recall model's mixers and state sizes, ``--attention``,
``benchmarks/attention_scaling.py --impl``, ``benchmarks/vit_variants.py``) reads this registry.

A variant is a function ``fn(q, k, v, *, causal, **gates, **options)`` on ``[batch, T, heads,
head_dim]`` arrays and one :func:`register` call; a module of one's own that registers a variant
is enough, no edit to the package (``docs/attention.md``)::

    from hw2jax.attention import registry

    def my_attention(q, k, v, *, causal, temperature=1.0):
        ...

    registry.register("mine", my_attention, options={"temperature": 1.0})

``gates`` name the per-step inputs a model computes from its tokens for the variant (see
:data:`GATES`); ``options`` map each option to its default, whose type is the option's schema
(an int option refuses a float, a choice among strings is given by ``choices``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax

from hw2jax.attention.decay import (
    bidirectional_retention,
    gated_linear_attention,
    retention,
    retention_decays,
)
from hw2jax.attention.delta_rule import delta_rule_attention, l2_normalise
from hw2jax.attention.kernelized import cosformer_attention, performer_attention
from hw2jax.attention.linear import FEATURE_MAPS, linear_attention
from hw2jax.attention.sliding_window import sliding_window_attention
from hw2jax.attention.softmax import softmax_attention
from hw2jax.config import Field
from hw2jax.errors import InputError

# The per-step inputs a variant may ask its model for, each computed from the tokens by the
# model's own projection: name -> what it is.
GATES = {
    "log_alpha": "log decay per step, head and key dim, [batch, T, heads, head_dim], <= 0",
    "head_log_alpha": "log decay per step and head, [batch, T, heads], <= 0",
    "beta": "write strength per step and head, [batch, T, heads], in (0, 1)",
}


class VariantError(InputError):
    """An unknown variant, a form it lacks (causal or not) or an option it does not take."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One registered attention variant.

    ``fn(q, k, v, *, causal, **gates, **options)``; ``causal`` / ``bidirectional``: whether it
    has that form (``missing_form`` says why not, for the error message); ``normalised``: its
    outputs are weighted averages of the values (False: un-normalised sums, to which a model
    may add a head norm); ``state_size(head_dim, seq_len, **options)``: the floats per head it
    carries from one step to the next when generating (None: unknown)."""

    name: str
    fn: Callable[..., jax.Array]
    causal: bool = True
    bidirectional: bool = True
    missing_form: str = ""
    gates: tuple[str, ...] = ()
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    normalised: bool = True
    state_size: Callable[..., int] | None = None
    description: str = ""

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults updated with ``options``, each checked against its default's type and
        its choices; raises one :class:`VariantError` naming the problem and the fix."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(sorted(self.options)) or "none"
            raise VariantError(
                f"attention {self.name!r} takes no option {', '.join(unknown)}; its options: "
                f"{takes}."
            )
        merged = {**self.options, **options}
        for key, value in options.items():
            default = self.options[key]
            kind = float if isinstance(default, float) else type(default)
            problem = Field(kind, choices=self.choices.get(key)).problem(value)
            if problem:
                raise VariantError(f"attention {self.name!r} option {key}: {problem}.")
            if isinstance(default, float):
                merged[key] = float(value)
        return merged

    def require(self, causal: bool) -> None:
        if (causal and not self.causal) or (not causal and not self.bidirectional):
            form = "causal" if causal else "bidirectional (non-causal)"
            raise VariantError(
                f"attention {self.name!r} has no {form} form. {self.missing_form}".strip()
            )

    def bind(self, *, causal: bool, **options: Any) -> Callable[..., jax.Array]:
        """``fn`` with its form and options fixed, checked now: ``f(q, k, v, **gates)``."""
        self.require(causal)
        merged = self.check_options(options)
        return lambda q, k, v, **gates: self.fn(q, k, v, causal=causal, **gates, **merged)

    def floats_per_head(self, head_dim: int, seq_len: int, **options: Any) -> int | None:
        if self.state_size is None:
            return None
        return self.state_size(head_dim, seq_len, **self.check_options(options))


_VARIANTS: dict[str, Variant] = {}


def register(name: str, fn: Callable[..., jax.Array], **fields: Any) -> Variant:
    """Registers ``fn`` as attention variant ``name`` (fields: see :class:`Variant`) and returns
    it. Registering a name again replaces the entry (a module reloaded); gates must be known."""
    if not name or not name.replace("_", "").isalnum():
        raise VariantError(f"variant name {name!r} must be letters, digits and underscores.")
    unknown = sorted(set(fields.get("gates", ())) - set(GATES))
    if unknown:
        raise VariantError(f"unknown gates {unknown}; a model can supply: {', '.join(GATES)}.")
    variant = Variant(name, fn, **fields)
    _VARIANTS[name] = variant
    return variant


def get(name: str) -> Variant:
    if name not in _VARIANTS:
        raise VariantError(
            f"unknown attention {name!r}; the registered ones: {', '.join(_VARIANTS)}. A variant "
            "of one's own is registered with hw2jax.attention.registry.register (see "
            "docs/attention.md); a config file may import the module that registers it."
        )
    return _VARIANTS[name]


def names(*, causal: bool | None = None, bidirectional: bool | None = None) -> tuple[str, ...]:
    """Registered names, optionally only those with a causal or a bidirectional form."""
    return tuple(
        n
        for n, v in _VARIANTS.items()
        if causal in (None, v.causal) and bidirectional in (None, v.bidirectional)
    )


# ------------------------------------------------------------------ the package's variants


def _softmax(q, k, v, *, causal):
    return softmax_attention(q, k, v, causal=causal)


def _linear(q, k, v, *, causal, feature_map):
    return linear_attention(q, k, v, causal=causal, feature_map=feature_map)


def _performer(q, k, v, *, causal, num_features, seed):
    # One fixed draw of random features (seed), so that every call is the same function.
    return performer_attention(
        q, k, v, causal=causal, num_features=num_features, key=jax.random.key(seed)
    )


def _cosformer(q, k, v, *, causal):
    return cosformer_attention(q, k, v, causal=causal)


def _retention(q, k, v, *, causal):
    if not causal:
        return bidirectional_retention(q, k, v)
    gamma = retention_decays(q.shape[2])
    return retention(q / math.sqrt(q.shape[-1]), k, v, gamma=gamma)


def _gla(q, k, v, *, causal, log_alpha):
    return gated_linear_attention(q / math.sqrt(q.shape[-1]), k, v, log_alpha)


def _ssd(q, k, v, *, causal, head_log_alpha):
    return gated_linear_attention(q / math.sqrt(q.shape[-1]), k, v, head_log_alpha)


def _deltanet(q, k, v, *, causal, beta):
    return delta_rule_attention(l2_normalise(q), l2_normalise(k), v, beta)


def _gated_deltanet(q, k, v, *, causal, beta, head_log_alpha):
    q, k = l2_normalise(q), l2_normalise(k)
    return delta_rule_attention(q, k, v, beta, log_alpha=head_log_alpha)


def _sliding_window(q, k, v, *, causal, window):
    return sliding_window_attention(q, k, v, window=window)


def _based(q, k, v, *, causal):
    return linear_attention(q, k, v, causal=causal, feature_map="taylor")


def _causal_only(what: str) -> str:
    return (
        f"{what} is a causal recurrence, its state built step by step over the past, and has "
        "no bidirectional form for unordered tokens such as a ViT's patches; use retention "
        "(its decay made symmetric), linear, based, performer or cosformer."
    )


register(
    "softmax",
    _softmax,
    state_size=lambda d, t: 2 * t * d,  # the key and value cache
    description="exact softmax attention (hw2jax.attention.dispatch picks the path)",
)
register(
    "linear",
    _linear,
    options={"feature_map": "elu"},
    choices={"feature_map": tuple(FEATURE_MAPS)},
    state_size=lambda d, t, feature_map: d * (d + 1),
    description="linear attention, phi(q) (sum phi(k) v^T) / phi(q) . sum phi(k)",
)
register(
    "performer",
    _performer,
    options={"num_features": 256, "seed": 0},
    state_size=lambda d, t, num_features, seed: num_features * (d + 1),
    description="Performer's FAVOR+ positive random features",
)
register(
    "cosformer",
    _cosformer,
    state_size=lambda d, t: 2 * d * (d + 1),
    description="cosFormer: relu features re-weighted by cos(pi/2 (i - j) / T)",
)
register(
    "retention",
    _retention,
    normalised=False,
    state_size=lambda d, t: d * d,
    description="RetNet's retention, one fixed decay per head (bidirectional: symmetric decay)",
)
register(
    "gla",
    _gla,
    bidirectional=False,
    missing_form=_causal_only("Gated linear attention"),
    gates=("log_alpha",),
    normalised=False,
    state_size=lambda d, t: d * d,
    description="gated linear attention, a data-dependent decay per key dim",
)
register(
    "ssd",
    _ssd,
    bidirectional=False,
    missing_form=_causal_only("Mamba-2's SSD"),
    gates=("head_log_alpha",),
    normalised=False,
    state_size=lambda d, t: d * d,
    description="Mamba-2's SSD: linear attention with one data-dependent decay per head",
)
register(
    "deltanet",
    _deltanet,
    bidirectional=False,
    missing_form=_causal_only("DeltaNet's delta rule"),
    gates=("beta",),
    normalised=False,
    state_size=lambda d, t: d * d,
    description="DeltaNet: the delta rule, the state corrected toward each new value",
)
register(
    "gated_deltanet",
    _gated_deltanet,
    bidirectional=False,
    missing_form=_causal_only("Gated DeltaNet"),
    gates=("beta", "head_log_alpha"),
    normalised=False,
    state_size=lambda d, t: d * d,
    description="Gated DeltaNet: the delta rule with a data-dependent decay per head",
)
register(
    "sliding_window",
    _sliding_window,
    bidirectional=False,
    missing_form=(
        "Sliding-window attention is defined over a sequence's past (the last `window` keys); "
        "a ViT's patches have no such order, and for FashionMNIST's 50 tokens any window of "
        "50 or more is plain softmax: use softmax."
    ),
    options={"window": 64},
    state_size=lambda d, t, window: 2 * min(window, t) * d,  # the window's key-value cache
    description="exact softmax over the last `window` keys (local attention)",
)
register(
    "based",
    _based,
    state_size=lambda d, t: (1 + d + d * d) * (d + 1),
    description="Based: linear attention with the exponential's 2nd-order Taylor features",
)
