"""The feature cache: pooled backbone vectors in shards, written once, read by every command.

``open(path)`` reads a cache, ``CacheWriter`` writes one. Where each part lives:
``format.py`` (layout, manifest, cache.json, errors), ``backends.py`` (the shard storage
protocol and its registry, filled by ``zarr_backend.py`` and ``hdf5_backend.py``),
``writer.py``, ``reader.py``, ``integrity.py`` (checks and checksums), ``locks.py``.
The files are described in docs/cache-format.md.
"""

# The backends register themselves on import, before anything looks one up; zarr first
# (the default, listed first in messages).
from mrlcache.cache import zarr_backend  # noqa: F401, I001
from mrlcache.cache import hdf5_backend  # noqa: F401
from mrlcache.cache.backends import BACKENDS, register_backend
from mrlcache.cache.format import (
    FORMAT_VERSION,
    CacheError,
    CacheLockedError,
    FormatVersionError,
    IncompleteCacheError,
    NotACacheError,
    SettingsMismatchError,
    read_meta,
)
from mrlcache.cache.reader import Cache, Shard
from mrlcache.cache.reader import open_cache as open
from mrlcache.cache.reader import verify_by_default
from mrlcache.cache.writer import CacheWriter

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
    "verify_by_default",
    "read_meta",
    "register_backend",
]
