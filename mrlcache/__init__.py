"""mrlcache: Matryoshka speaker embeddings from a frozen ReDimNet, feature-cache-first.

The heavy entry points are imported lazily so that ``import mrlcache`` and
``mrlcache --help`` stay fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_backbone": "mrlcache.backbone.loading",
    "load_model": "mrlcache.models.model",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrlcache' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
