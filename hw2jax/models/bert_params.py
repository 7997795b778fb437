"""Hugging Face BERT checkpoint names <-> :class:`hw2jax.models.bert.BertModel` params, as tables.

A checkpoint tensor is ``[prefix.]<module>.<leaf>``: the prefix (``bert.`` or ``model.``) is
dropped, the module is looked up below and the leaf renamed by the module's kind. Tensors of
no module here (``position_ids`` buffers, the ``cls.*`` pre-training heads) are not part of
the encoder and are skipped.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax.errors import InputError

# Hugging Face module                      ours                                      kind
_TOP_MODULES = {
    "embeddings.word_embeddings":          (("embeddings", "word_embeddings"),       "embed"),
    "embeddings.position_embeddings":      (("embeddings", "position_embeddings"),   "embed"),
    "embeddings.token_type_embeddings":    (("embeddings", "token_type_embeddings"), "embed"),
    "embeddings.LayerNorm":                (("embeddings", "LayerNorm"),             "norm"),
    "pooler.dense":                        (("pooler_dense",),                       "dense"),
}  # fmt: skip
# Inside encoder.layer.N (ours: layer_N).
_LAYER_MODULES = {
    "attention.self.query":                ("query",                      "dense"),
    "attention.self.key":                  ("key",                        "dense"),
    "attention.self.value":                ("value",                      "dense"),
    "attention.output.dense":              ("attention_output_dense",     "dense"),
    "attention.output.LayerNorm":          ("attention_output_LayerNorm", "norm"),
    "intermediate.dense":                  ("intermediate_dense",         "dense"),
    "output.dense":                        ("output_dense",               "dense"),
    "output.LayerNorm":                    ("output_LayerNorm",           "norm"),
}  # fmt: skip
# Leaf names by kind: older checkpoints (bert-base-uncased) name LayerNorm's gamma and beta.
_LEAVES = {
    "embed": {"weight": "embedding"},
    "norm": {"weight": "scale", "gamma": "scale", "bias": "bias", "beta": "bias"},
    "dense": {"weight": "kernel", "bias": "bias"},
}
_PREFIXES = ("bert.", "model.")
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")


def hf_name_to_path(name: str) -> tuple[tuple[str, ...], str] | None:
    """'bert.encoder.layer.3.attention.self.query.weight' -> (('layer_3', 'query', 'kernel'),
    'dense'); None for a tensor that is not part of the encoder."""
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    module, _, leaf = name.rpartition(".")
    if module in _TOP_MODULES:
        path, kind = _TOP_MODULES[module]
    elif (m := _LAYER.fullmatch(module)) and m.group(2) in _LAYER_MODULES:
        ours, kind = _LAYER_MODULES[m.group(2)]
        path = (f"layer_{m.group(1)}", ours)
    else:
        return None
    renamed = _LEAVES[kind].get(leaf)
    return None if renamed is None else ((*path, renamed), kind)


def map_state_dict(tensors: dict[str, np.ndarray], expected: dict) -> dict:
    """Maps Hugging Face tensor names onto a BertModel's params, whose shapes ``expected`` gives
    (``jax.eval_shape`` of its init); checks that nothing is missing and that every shape fits."""
    params: dict = {}
    for name, value in tensors.items():
        found = hf_name_to_path(name)
        if found is None:
            continue
        path, kind = found
        if kind == "dense" and path[-1] == "kernel":
            value = value.T  # torch Linear stores [out, in]
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value, jnp.float32)
    flat_expected = _flat(expected)
    flat_got = _flat(params)
    missing = sorted(set(flat_expected) - set(flat_got))
    if missing:
        raise InputError(f"checkpoint lacks {len(missing)} encoder tensors, e.g. {missing[:3]}.")
    for key, spec in flat_expected.items():
        if flat_got[key].shape != spec.shape:
            raise InputError(
                f"checkpoint tensor {key} has shape {flat_got[key].shape}, the config expects "
                f"{spec.shape}; does config.json belong to these weights?"
            )
    return params


def state_dict_from_params(
    params: dict, prefix: str = "", legacy_layer_norm: bool = False
) -> dict[str, np.ndarray]:
    """The inverse of :func:`map_state_dict`, each name after ``prefix`` (e.g.
    ``"bert."``), LayerNorm as ``weight``/``bias`` or, with ``legacy_layer_norm``, as
    ``gamma``/``beta`` (bert-base-uncased's original checkpoint)."""
    inverse = {path: (module, kind) for module, (path, kind) in _TOP_MODULES.items()}
    out = {}
    for key, value in _flat(params, as_keys=True).items():
        *module_path, leaf = key
        value = np.asarray(value, np.float32)
        if module_path[0].startswith("layer_"):
            ours = module_path[1]
            module, kind = next((m, k) for m, (o, k) in _LAYER_MODULES.items() if o == ours)
            module = f"encoder.layer.{module_path[0].removeprefix('layer_')}.{module}"
        else:
            module, kind = inverse[tuple(module_path)]
        hf_leaf = {"embedding": "weight", "scale": "weight", "kernel": "weight"}.get(leaf, leaf)
        if kind == "norm" and legacy_layer_norm:
            hf_leaf = {"weight": "gamma", "bias": "beta"}[hf_leaf]
        if kind == "dense" and leaf == "kernel":
            value = value.T
        out[f"{prefix}{module}.{hf_leaf}"] = np.ascontiguousarray(value)
    return out


def _flat(tree: dict, as_keys: bool = False) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if as_keys:
        return {tuple(p.key for p in path): v for path, v in leaves}
    return {jax.tree_util.keystr(path): v for path, v in leaves}
