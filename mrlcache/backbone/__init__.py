"""ReDimNet backbone: architecture (`redimnet`), log-mel front end (`features`), checkpoints and
the one source of backbone bytes and SHA-256 (`loading`), where weights come from (`record`)."""

from mrlcache.backbone.loading import (
    VARIANTS,
    CheckpointError,
    UnsafeFileError,
    backbone_bytes,
    backbone_for_cache,
    load_backbone,
    save_checkpoint,
    state_sha256,
)
from mrlcache.backbone.record import BackboneRecord, RecordError
from mrlcache.backbone.redimnet import CONFIGS, ConfigError, ReDimNet

__all__ = ["CONFIGS", "VARIANTS", "BackboneRecord", "CheckpointError", "ConfigError", "ReDimNet", "RecordError",
           "UnsafeFileError", "backbone_bytes", "backbone_for_cache", "load_backbone", "save_checkpoint",
           "state_sha256"]
