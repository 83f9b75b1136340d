"""Frozen encoders: ReDimNet (`redimnet`, `blocks`, `features`), ECAPA-TDNN (`ecapa_tdnn`) and
CAM++ (`campplus`), named in `registry` (torch-free); checkpoints and the one source of
backbone bytes and SHA-256 (`loading`), where weights come from (`record`).

Names are imported lazily, so that ``mrlcache.backbone.registry`` can be read without torch.
"""

_LAZY = {
    "VARIANTS": "mrlcache.backbone.loading",
    "CheckpointError": "mrlcache.backbone.loading",
    "UnsafeFileError": "mrlcache.backbone.loading",
    "backbone_bytes": "mrlcache.backbone.loading",
    "backbone_for_cache": "mrlcache.backbone.loading",
    "load_backbone": "mrlcache.backbone.loading",
    "save_checkpoint": "mrlcache.backbone.loading",
    "state_sha256": "mrlcache.backbone.loading",
    "BackboneRecord": "mrlcache.backbone.record",
    "RecordError": "mrlcache.backbone.record",
    "CONFIGS": "mrlcache.backbone.redimnet",
    "ConfigError": "mrlcache.backbone.redimnet",
    "ReDimNet": "mrlcache.backbone.redimnet",
    "BACKBONES": "mrlcache.backbone.registry",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrlcache.backbone' has no attribute {name!r}")


__all__ = sorted(_LAZY)
