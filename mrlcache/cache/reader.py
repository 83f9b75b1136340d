"""Reading a cache: ``open_cache(path)`` checks it and returns a :class:`Cache` of shards.

Opening always checks the structure (cache.json, the manifest against its recorded
SHA-256, every shard's numbers, shape, chunks and index), which reads no vectors;
``verify=True`` (or :meth:`Cache.verify`) also recomputes every shard's checksums.
:func:`problems` lists everything wrong with a cache instead of raising on the first.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from mrlcache.cache import integrity, layout
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
    """One complete shard: its streams and the ids of the utterances they belong to."""

    def __init__(self, path: Path, backend, attrs: dict, index: np.ndarray, utt_ids, speakers, streams: dict,
                 views: int):
        self.path = path
        self._backend = backend
        self.attrs = attrs
        self.number = int(attrs["shard"])
        self.index = index  # (n,) manifest rows
        self.skipped = dict(attrs["skipped"])
        self.seconds = float(attrs["seconds"])
        self.streams = streams  # {name: StreamRecord}
        self.num_views = int(views)
        self.utterances = [utt_ids[i] for i in index]
        self.speakers = [speakers[i] for i in index]
        self._offsets = {}

    def __len__(self) -> int:
        return len(self.index)

    def read(self, stream: str = "pooled", view: int | None = None, rows=None, dtype=np.float32, out=None):
        """One stream of this shard (shapes as :meth:`Cache.read`); ``rows``: positions in the
        shard (any order, repeats allowed), reading only their bytes (dense streams) or
        frames (ragged); ``out``:
        a dense stream's whole selection is read into it (returned)."""
        record = _check_stream(stream, self.streams)
        n = len(self)
        view = _check_view(view, self.num_views)
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if len(rows) and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"rows out of range: shard {self.number} holds {n} rows")
        if record.ragged:
            return self._read_ragged(record, view, rows, dtype)
        selection = [slice(None) if view is None else view]
        if rows is None:
            if out is None:
                out = np.empty((n, *(() if view is not None else (self.num_views,)), *record.item_shape), dtype)
            data = self._backend.read_array(self.path, stream, [slice(None)] + selection, out=out)
        else:
            # Each distinct row once, as byte ranges of the chunks holding it (only its bytes
            # are read, whatever the chunking: benchmarks/README.md, issue 22), then reordered.
            unique, inverse = np.unique(rows, return_inverse=True)
            views = range(self.num_views) if view is None else [view]
            stored = np.empty((len(views), len(unique), *record.item_shape), record.dtype)
            for i, v in enumerate(views):
                self._backend.read_rows(self.path, stream, v, unique, stored[i])
            stored = stored[0] if view is not None else np.ascontiguousarray(np.moveaxis(stored, 0, 1))
            data = stored if np.array_equal(unique, rows) else stored[inverse]
            data = data.astype(dtype, copy=False)
            if out is not None:
                out[...] = data
                data = out
        return record.decode(data)

    def offsets(self, stream: str) -> np.ndarray:
        """(n + 1,) int64 frame offsets of a ragged stream: row i is frames offsets[i]:offsets[i+1]."""
        if stream not in self._offsets:
            self._offsets[stream] = self._backend.read_array(self.path, stream + layout.OFFSETS)
        return self._offsets[stream]

    def _read_ragged(self, record, view, rows, dtype) -> list[np.ndarray]:
        if view not in (None, 0):
            raise IndexError(f"stream {record.name!r} is ragged (eval mode): it has view 0 only")
        offsets = self.offsets(record.name)
        lead = [slice(None)] * len(record.shape)
        if rows is None:  # one read of every frame, split into utterances
            values = record.decode(self._backend.read_array(self.path, record.name).astype(dtype, copy=False))
            return [values[..., a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        out = []
        for r in rows:
            part = self._backend.read_array(self.path, record.name,
                                            lead + [slice(int(offsets[r]), int(offsets[r + 1]))])
            out.append(record.decode(part.astype(dtype, copy=False)))
        return out


def _check_stream(stream: str, streams: dict) -> dict:
    if stream not in streams:
        raise KeyError(f"stream {stream!r}: this cache holds {', '.join(repr(s) for s in streams)}")
    return streams[stream]


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
        # {name: StreamRecord}; pooled alone in caches without "streams"
        self.streams = layout.cache_records(meta)
        self._manifest = _read_checked_manifest(path, meta)
        utt_ids, speakers, _ = self._manifest
        row_of = {u: i for i, u in enumerate(utt_ids)}
        self.shards: list[Shard] = []
        for k in sorted(shard_files):
            attrs, index = integrity.inspect_shard(self._backend, shard_files[k], k, meta, row_of)
            self.shards.append(Shard(shard_files[k], self._backend, attrs, index, utt_ids, speakers,
                                     self.streams, self.num_views))
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

    def read(self, stream: str = "pooled", view: int | None = None, rows=None, dtype=np.float32):
        """One stream of the cache, in cache order (or the order of ``rows``).

        Vector streams: (N, V, *shape), or (N, *shape) for one view; dense frame streams
        (train mode): (N, V, *shape, T) or (N, *shape, T); ragged frame streams (eval
        mode, view 0 only): a list of N arrays (*shape, T_i). ``rows``: positions in cache
        order (an int array); only the shards, and within them the chunks, holding them
        are read. Pooled vectors without ``rows`` are read shard by shard straight into one
        preallocated array.

        Raises:
            KeyError: the cache has no such stream (naming the ones it holds).
        """
        record = _check_stream(stream, self.streams)
        view = _check_view(view, self.num_views)
        if rows is not None:
            return self._read_rows(stream, record, view, rows, dtype)
        if record.ragged:
            return [x for shard in self.shards for x in shard.read(stream, view, dtype=dtype)]
        lead = () if view is not None else (self.num_views,)
        out = np.empty((len(self), *lead, *record.item_shape), dtype=dtype)
        start = 0
        for shard in self.shards:  # straight into one preallocated array
            shard.read(stream, view, dtype=dtype, out=out[start:start + len(shard)])
            start += len(shard)
        return out

    def _read_rows(self, stream, record, view, rows, dtype):
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range: the cache holds {len(self)} rows (0..{len(self) - 1})")
        starts = np.cumsum([0] + [len(s) for s in self.shards])
        which = np.searchsorted(starts, rows, side="right") - 1  # shard of each row
        out = [None] * len(rows) if record.ragged else None
        for k in np.unique(which):
            picked = np.flatnonzero(which == k)
            part = self.shards[k].read(stream, view, rows=rows[picked] - starts[k], dtype=dtype)
            if record.ragged:
                for i, x in zip(picked, part):
                    out[i] = x
                continue
            if out is None:
                out = np.empty((len(rows), *part.shape[1:]), dtype=part.dtype)
            out[picked] = part
        if out is None:  # no rows asked
            lead = () if view is not None else (self.num_views,)
            out = np.empty((0, *lead, *record.item_shape), dtype=dtype)
        return out

    def index_of(self, utt_ids) -> np.ndarray:
        """Positions (rows of :meth:`read`) of ``utt_ids``; (len(utt_ids),) int64.

        Raises:
            KeyError: some ids have no vector (naming the first few and whether they were skipped).
        """
        if self._position is None:
            self._position = {u: i for i, u in enumerate(self.utterances)}
        out = np.fromiter(map(self._position.get, utt_ids, itertools.repeat(-1)), dtype=np.int64, count=len(utt_ids))
        missing = [utt_ids[i] for i in np.flatnonzero(out < 0)]
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
            bad = integrity.checksum_problems(self._backend, shard.path, shard.attrs, shard.index)
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


# What ``open_cache`` does when not told: the ``--verify`` option of the commands that read
# caches sets it for the whole process (every cache the command opens is then checked).
_VERIFY_BY_DEFAULT = False


def verify_by_default(flag: bool) -> None:
    """Make every later :func:`open_cache` without ``verify=`` verify checksums (or stop)."""
    global _VERIFY_BY_DEFAULT
    _VERIFY_BY_DEFAULT = bool(flag)


def open_cache(path, allow_incomplete: bool = False, verify: bool | None = None) -> Cache:
    """Open the cache directory ``path`` for reading.

    Args:
        allow_incomplete: read the shards present when some are missing.
        verify: also recompute every shard's checksums (reads every vector once); None:
            as set by :func:`verify_by_default` (off unless a command's ``--verify``).

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
    if _VERIFY_BY_DEFAULT if verify is None else verify:
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
            attrs, index = integrity.inspect_shard(backend, files[k], k, meta, row_of)
        except DamagedCacheError as err:
            found.append(str(err))
            continue
        if full:
            bad = integrity.checksum_problems(backend, files[k], attrs, index)
            if bad:
                found.append(str(integrity.damaged(files[k], bad)))
                continue
        sound[k] = attrs
    summary = meta.get("summary")
    if isinstance(summary, dict) and len(sound) == total:
        wrong = integrity.stale_keys(summary, integrity.totals(path, sound, meta, backend))
        if wrong:
            found.append(
                f"{path / 'cache.json'}: summary disagrees with the shards ({', '.join(wrong)}); "
                f"rerun the same 'mrlcache extract' command to recompute it"
            )
    return found



