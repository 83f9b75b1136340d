"""The one pass: frozen backbone over a speaker corpus into a sharded feature cache.

``config.py`` (ExtractConfig, every setting), ``data.py`` (decoding workers, shard
batches, progress), ``run.py`` (the pass: ranks, shards, the writer). See run.py's
docstring for the data path, determinism and scale-out.
"""

from mrlcache.extract.config import ExtractConfig, ExtractError
from mrlcache.extract.data import shard_batches
from mrlcache.extract.run import BACKBONE_FILE, cache_meta, extract

__all__ = ["BACKBONE_FILE", "ExtractConfig", "ExtractError", "cache_meta", "extract", "shard_batches"]
