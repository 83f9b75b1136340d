"""Inference modules, below training: what a model file holds and what ``export`` writes.

- ``matryoshka.py``: the Matryoshka head (BatchNorm + linear; every size a prefix);
- ``ecapa.py``: ECAPA-TDNN over frames, ending in the Matryoshka projection;
- ``fusion.py``: stream encoders and fusions;
- ``adaptor.py``: heads started from the encoder's published embedding (``WarmHead``, the
  orthogonal ``AdaptorHead``; started and trained by :mod:`mrlcache.fit.adaptor`);
- ``streams.py``: :class:`~mrlcache.models.streams.StreamModel`, encoders + fusion + head on streams;
- ``record.py``: the record model.pt rebuilds its model from (the one rebuild path);
- ``model.py``: the deployable model (``MRLModel``, ``save_model``, ``load_model``).

The registries below are the one place a head or fusion is named. They hold
``"module:Class"`` strings so this module imports no torch: the command line reads the
names for its choices. Nothing in this package imports :mod:`mrlcache.fit`
(tests/test_imports.py checks it): the losses, the loop and the schedules that
train these modules live there.

A head class declares, besides ``forward`` (input -> (B, dims[-1]), raw):

- ``reads``: ``"vector"`` (B, width) or ``"frames"`` (B, width, T);
- ``width_arg``: the constructor argument that takes the input width;
- ``option_args(options)`` (static): its own constructor arguments from a fit's head
  options (``FitConfig.head``, or any object with the named attributes), beside the width
  and ``dims``;
- ``args()``: every constructor argument, plain values: ``Class(**head.args())`` rebuilds it;
- ``dims`` and ``pooled_dim`` attributes (``pooled_dim``: the width of a head on vectors, else None).

A head taking fit options beyond its own (``--margins``...) names them in :data:`HEAD_SUPPORTS`.

A fusion class takes ``(in_dims, out_dim)`` and maps a list of encoded streams (all frames
(B, D_i, T_i) or all vectors (B, D_i)) to (B, out_dim, T_0) or (B, out_dim).
"""

from __future__ import annotations

import importlib

HEADS = {
    "mrl": "mrlcache.models.matryoshka:MatryoshkaHead",
    "ecapa": "mrlcache.models.ecapa:ECAPATDNN",
    "warm": "mrlcache.models.adaptor:WarmHead",  # fit --init published (not --head: it needs the published start)
    "adaptor": "mrlcache.models.adaptor:AdaptorHead",  # fit --objective adaptor* (likewise)
}
STARTED_HEADS = ("warm", "adaptor")  # built by mrlcache.fit.adaptor from the published embedding, never by --head
# The fit options a head takes beside its own (``option_args``); a head not listed takes none.
# margins and grad_scaling act on the prefixes of one Matryoshka projection; fixed_baselines
# fits one such projection per dim beside it; published_start (--init published, --objective
# adaptor*) starts it from the encoder's published embedding (a linear map of the pooled vector).
HEAD_SUPPORTS = {"mrl": ("margins", "grad_scaling", "fixed_baselines", "published_start")}
FUSIONS = {
    "concat": "mrlcache.models.fusion:ConcatFusion",
    "cross-attention": "mrlcache.models.fusion:CrossAttentionFusion",
    "gating": "mrlcache.models.fusion:GatingFusion",
}


def _load(registry: dict, kind: str, name: str) -> type:
    if name not in registry:
        raise ValueError(f"{kind} {name!r}: choose one of {', '.join(registry)}")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(module), cls)


def head_class(name: str) -> type:
    """The head class registered as ``name``; ValueError naming the choices otherwise."""
    return _load(HEADS, "head", name)


def fusion_class(name: str) -> type:
    """The fusion class registered as ``name``; ValueError naming the choices otherwise."""
    return _load(FUSIONS, "fusion", name)


def head_supports(name: str) -> tuple[str, ...]:
    """The fit options of :data:`HEAD_SUPPORTS` head ``name`` takes (torch-free)."""
    return HEAD_SUPPORTS.get(name, ())


def head_name(head) -> str:
    """The registry name of a head module (the name its record stores)."""
    path = f"{type(head).__module__}:{type(head).__qualname__}"
    for name, where in HEADS.items():
        if where == path:
            return name
    raise ValueError(f"{path} is not a registered head (mrlcache.models.HEADS)")


def head_args(name: str, width: int, dims, options) -> dict:
    """Constructor arguments of head ``name`` over inputs of ``width``: width, dims and its own options."""
    cls = head_class(name)
    return {cls.width_arg: int(width), "dims": [int(d) for d in dims], **cls.option_args(options)}
