"""Reading a cache: ``open_cache(path)`` checks it and returns a :class:`Cache` of shards.

Opening always checks the structure (cache.json, the manifest against its recorded
SHA-256, every shard's numbers, shape, chunks and index), which reads no vectors;
``verify=True`` (or :meth:`Cache.verify`) also recomputes every shard's checksums.
:func:`problems` lists everything wrong with a cache instead of raising on the first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mrlcache.cache import integrity
from mrlcache.cache.backends import BACKENDS
from mrlcache.cache.format import (
    MANIFEST_FILE,
    SHARDS_DIR,
    CacheError,
    DamagedCacheError,
    IncompleteCacheError,
    check_manifest,
    num_shards,
    read_manifest,
    read_meta,
    shard_files,
)


class Shard:
    """One complete shard: its vectors and the ids of the utterances they belong to."""

    def __init__(self, path: Path, backend, attrs: dict, index: np.ndarray, shape: tuple, utt_ids, speakers):
        self.path = path
        self._backend = backend
        self.attrs = attrs
        self.number = int(attrs["shard"])
        self.index = index  # (n,) manifest rows
        self.skipped = dict(attrs["skipped"])
        self.seconds = float(attrs["seconds"])
        self.shape = shape  # (n, V, D)
        self.utterances = [utt_ids[i] for i in index]
        self.speakers = [speakers[i] for i in index]

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, stream: str = "pooled", view: int | None = None, dtype=np.float32) -> np.ndarray:
        """Vectors of this shard: (n, V, D), or (n, D) for one view."""
        _check_stream(stream)
        n, views, dim = self.shape
        out = np.empty((n, views, dim) if view is None else (n, dim), dtype=dtype)
        self._backend.read_pooled(self.path, out, _check_view(view, views))
        return out


def _check_stream(stream: str) -> None:
    if stream != "pooled":
        raise KeyError(f"stream {stream!r}: this cache holds only 'pooled'")


def _check_view(view, views: int):
    if view is not None and not 0 <= int(view) < views:
        raise IndexError(f"view {view} out of range: the cache holds {views} views (0..{views - 1})")
    return None if view is None else int(view)


def _read_checked_manifest(path: Path, meta: dict):
    problem = check_manifest(path, meta)
    if problem:
        raise DamagedCacheError(problem)
    manifest = read_manifest(path / MANIFEST_FILE)
    if len(manifest[0]) != meta["num_utterances"]:
        raise CacheError(
            f"{path / MANIFEST_FILE}: {len(manifest[0])} rows but cache.json plans {meta['num_utterances']}"
        )
    return manifest


class Cache:
    """A cache opened for reading (see :func:`open_cache`).

    Vectors are in cache order: shard by shard, each shard in manifest order, only the
    utterances that have vectors.

    Raises:
        DamagedCacheError: the manifest or a shard is damaged (naming it and the fix).
    """

    def __init__(self, path: Path, meta: dict, shard_files: dict[int, Path]):
        self.path = path
        self.meta = meta
        self._backend = BACKENDS[meta["format"]]
        self._manifest = _read_checked_manifest(path, meta)
        utt_ids, speakers, _ = self._manifest
        row_of = {u: i for i, u in enumerate(utt_ids)}
        self.shards: list[Shard] = []
        for k in sorted(shard_files):
            attrs, index, shape = integrity.inspect_shard(self._backend, shard_files[k], k, meta, row_of)
            self.shards.append(Shard(shard_files[k], self._backend, attrs, index, shape, utt_ids, speakers))
        self.utterances = [u for s in self.shards for u in s.utterances]
        self.speakers = [s_ for s in self.shards for s_ in s.speakers]
        self.skipped = {u: r for s in self.shards for u, r in s.skipped.items()}
        self._position = None

    @property
    def num_views(self) -> int:
        return int(self.meta["views"])

    @property
    def dim(self) -> int:
        return int(self.meta["pooled_dim"])

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype (float16 or float32)."""
        return np.dtype(self.meta["dtype"])

    def __len__(self) -> int:
        return len(self.utterances)

    def __repr__(self) -> str:
        return (
            f"Cache({str(self.path)!r}, utterances={len(self)}, views={self.num_views}, "
            f"dim={self.dim}, dtype={self.meta['dtype']}, format={self.meta['format']}, "
            f"skipped={len(self.skipped)})"
        )

    def iter_shards(self):
        """Yield the shards in cache order (each with .utterances, .speakers, .read())."""
        yield from self.shards

    def read(self, stream: str = "pooled", view: int | None = None, dtype=np.float32) -> np.ndarray:
        """All vectors of ``stream``: (N, V, D), or (N, D) for one view (only that view is read).

        Each shard is read whole straight into its slice of one preallocated array.
        """
        _check_stream(stream)
        view = _check_view(view, self.num_views)
        n = len(self)
        out = np.empty((n, self.num_views, self.dim) if view is None else (n, self.dim), dtype=dtype)
        start = 0
        for shard in self.shards:
            stop = start + len(shard)
            self._backend.read_pooled(shard.path, out[start:stop], view)
            start = stop
        return out

    def index_of(self, utt_ids) -> np.ndarray:
        """Positions (rows of :meth:`read`) of ``utt_ids``; (len(utt_ids),) int64.

        Raises:
            KeyError: some ids have no vector (naming the first few and whether they were skipped).
        """
        if self._position is None:
            self._position = {u: i for i, u in enumerate(self.utterances)}
        pos, missing = self._position, []
        out = np.empty(len(utt_ids), dtype=np.int64)
        for i, u in enumerate(utt_ids):
            p = pos.get(u)
            if p is None:
                missing.append(u)
                p = -1
            out[i] = p
        if missing:
            shown = ", ".join(
                f"{u!r}" + (f" (skipped: {self.skipped[u]})" if u in self.skipped else "")
                for u in missing[:5]
            )
            raise KeyError(f"{len(missing)} utterance ids have no vector in {self.path}: {shown}")
        return out

    def checksum_problems(self) -> list[str]:
        """One line per shard whose vectors or index no longer match their checksums (reads all)."""
        found = []
        for shard in self.shards:
            bad = integrity.checksum_problems(
                self._backend, shard.path, shard.attrs, shard.index, shard.shape, self.dtype
            )
            if bad:
                found.append(str(integrity.damaged(shard.path, bad)))
        return found

    def verify(self, full: bool = True) -> None:
        """Check the cache again: structure always, every checksum if ``full`` (reads all vectors).

        Raises:
            DamagedCacheError: naming every damaged shard and the fix.
        """
        found = problems(self.path, full=False)
        if not found and full:
            found = self.checksum_problems()
        if found:
            raise DamagedCacheError("\n".join(found))


def open_cache(path, allow_incomplete: bool = False, verify: bool = False) -> Cache:
    """Open the cache directory ``path`` for reading.

    Args:
        allow_incomplete: read the shards present when some are missing.
        verify: also recompute every shard's checksums (reads every vector once).

    Raises:
        NotACacheError: path missing or not a cache.
        FormatVersionError: written by an incompatible mrlcache.
        IncompleteCacheError: shards missing (unless ``allow_incomplete``).
        DamagedCacheError: the manifest or a shard is damaged.
    """
    path = Path(path)
    meta = read_meta(path)
    total = num_shards(meta["num_utterances"], meta["shard_size"])
    files = {k: p for k, p in shard_files(path / SHARDS_DIR, meta["format"]).items() if k < total}
    missing = total - len(files)
    if missing and not allow_incomplete:
        raise IncompleteCacheError(
            f"{path}: {missing} of {total} shards missing (extraction did not finish); "
            f"rerun the same 'mrlcache extract' command to complete it"
        )
    cache = Cache(path, meta, files)
    if verify:
        found = cache.checksum_problems()
        if found:
            raise DamagedCacheError("\n".join(found))
    return cache


def problems(path, full: bool = False) -> list[str]:
    """Everything wrong with the cache at ``path``, one line each; empty when it is sound.

    Checks cache.json, the manifest, each shard's structure (missing shards included), the
    summary's totals, and with ``full`` every shard's checksums.
    """
    path = Path(path)
    try:
        meta = read_meta(path)
        manifest = _read_checked_manifest(path, meta)
    except CacheError as err:
        return [str(err)]
    backend = BACKENDS[meta["format"]]
    total = num_shards(meta["num_utterances"], meta["shard_size"])
    files = shard_files(path / SHARDS_DIR, meta["format"])
    row_of = {u: i for i, u in enumerate(manifest[0])}
    found, sound = [], {}
    missing = [k for k in range(total) if k not in files]
    if missing:
        found.append(
            f"{path}: {len(missing)} of {total} shards missing (first: {missing[:5]}); "
            f"rerun the same 'mrlcache extract' command to complete it"
        )
    for k in sorted(k for k in files if k < total):
        try:
            attrs, index, shape = integrity.inspect_shard(backend, files[k], k, meta, row_of)
        except DamagedCacheError as err:
            found.append(str(err))
            continue
        if full:
            bad = integrity.checksum_problems(backend, files[k], attrs, index, shape, np.dtype(meta["dtype"]))
            if bad:
                found.append(str(integrity.damaged(files[k], bad)))
                continue
        sound[k] = attrs
    summary = meta.get("summary")
    if isinstance(summary, dict) and len(sound) == total:
        wrong = integrity.stale_keys(summary, integrity.totals(path, sound))
        if wrong:
            found.append(
                f"{path / 'cache.json'}: summary disagrees with the shards ({', '.join(wrong)}); "
                f"rerun the same 'mrlcache extract' command to recompute it"
            )
    return found



