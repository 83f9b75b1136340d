"""ReDimNet backbone: architecture (`redimnet`), log-mel front end (`features`), checkpoints (`loading`)."""

from mrlcache.models.redimnet import CONFIGS, ConfigError, ReDimNet

__all__ = ["CONFIGS", "ConfigError", "ReDimNet"]
