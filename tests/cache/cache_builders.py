"""Builders shared by the cache tests: a small manifest, its metadata, vectors, a cache.

Import with ``from cache_builders import ...`` (pytest puts tests/cache/ on sys.path).
"""

from __future__ import annotations

import numpy as np

import mrlcache.cache as cache
from mrlcache.corpus import Utterance

BACKENDS = ["zarr", "hdf5"]
V, D = 3, 16


def make_manifest(n: int) -> list[Utterance]:
    """n utterances of 4 speakers, ids like the VoxCeleb trial lists use."""
    ids = [f"id{i % 4:05d}/vid/{i:05d}.wav" for i in range(n)]
    return [Utterance(u, "/data/" + u, u.split("/")[0]) for u in ids]


def make_meta(**changes) -> dict:
    meta = {
        "model_config": {"F": 72, "C": 16},
        "weights_sha256": "ab" * 32,
        "pooled_dim": D,
        "sample_rate": 16000,
        "mode": "train",
        "crop_seconds": 2.0,
        "max_seconds": None,
        "views": V,
        "augment": {"noise_snr": [5, 20], "reverb": 0.5},
        "seed": 7,
        "dtype": "float32",
        "shard_size": 4,
    }
    meta.update(changes)
    return meta


# Utterance rows that have no vector, with their reason (rows 2 and 9).
SKIPPED_ROWS = {2: "silent", 9: "unreadable"}


def vectors(n: int, views: int = V, dim: int = D) -> np.ndarray:
    """Deterministic vectors for manifest rows 0..n-1: (n, views, dim) float32."""
    return np.random.default_rng(0).standard_normal((n, views, dim)).astype(np.float32)


def write_cache(out, backend="zarr", n=10, shards=None, meta=None, **kwargs):
    """Write the shards ``shards`` (default all) of an n-utterance cache; return the writer."""
    manifest = make_manifest(n)
    meta = meta or make_meta()
    data = vectors(n, meta["views"], meta["pooled_dim"])
    writer = cache.CacheWriter(out, meta, manifest, backend=backend, **kwargs)
    for k in range(writer.num_shards) if shards is None else shards:
        rows = writer.shard_rows(k)
        index = [r for r in rows if r not in SKIPPED_ROWS]
        skipped = {manifest[r].utt_id: SKIPPED_ROWS[r] for r in rows if r in SKIPPED_ROWS}
        writer.write_shard(k, index, data[index], skipped, seconds=2.5 * len(rows))
    return writer


OK_ROWS = [r for r in range(10) if r not in SKIPPED_ROWS]
