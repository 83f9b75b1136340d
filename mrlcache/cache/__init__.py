"""The feature cache: pooled backbone vectors in shards, written once, read by every command.

``open(path)`` reads a cache, ``CacheWriter`` writes one; the layout is in
``format.py`` and docs/cache-format.md.
"""

from mrlcache.cache.format import (
    BACKENDS,
    FORMAT_VERSION,
    Cache,
    CacheError,
    CacheLockedError,
    CacheWriter,
    FormatVersionError,
    IncompleteCacheError,
    NotACacheError,
    SettingsMismatchError,
    Shard,
)
from mrlcache.cache.format import open_cache as open

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "Cache",
    "CacheError",
    "CacheLockedError",
    "CacheWriter",
    "FormatVersionError",
    "IncompleteCacheError",
    "NotACacheError",
    "SettingsMismatchError",
    "Shard",
    "open",
]
