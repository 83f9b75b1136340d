"""ReDimNet backbone: architecture (`redimnet`), log-mel front end (`features`), checkpoints (`loading`)."""

from mrlcache.models.loading import CheckpointError, load_backbone, save_checkpoint
from mrlcache.models.redimnet import CONFIGS, ConfigError, ReDimNet

__all__ = ["CONFIGS", "CheckpointError", "ConfigError", "ReDimNet", "load_backbone", "save_checkpoint"]
