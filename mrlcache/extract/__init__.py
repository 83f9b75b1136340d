"""The one pass: frozen backbone over a speaker corpus into a sharded feature cache.

``config.py`` (ExtractConfig, every setting, by component: backbone, views, storage,
run), ``prepare.py`` (the utterances, models and rank of a pass; ``extract_corpus``, the
whole pass the command runs), ``data.py`` (decoding workers, shard batches, progress),
``buckets.py`` (eval mode's batches of equal-length utterances), ``run.py`` (the pass:
ranks, shards, the writer). See run.py's docstring for the data path, determinism and
scale-out.
"""

from mrlcache.extract.config import ExtractConfig, ExtractError

_LAZY = {"shard_batches": "mrlcache.extract.data", "BACKBONE_FILE": "mrlcache.extract.run",
         "cache_meta": "mrlcache.extract.run", "extract": "mrlcache.extract.run"}


def __getattr__(name):
    # The pass imports torch; the config does not, so the command line reads ExtractConfig
    # (its options' defaults and ranges) without loading torch for --help.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrlcache.extract' has no attribute {name!r}")

__all__ = ["BACKBONE_FILE", "ExtractConfig", "ExtractError", "cache_meta", "extract", "shard_batches"]
