"""Streams in a shard: the arrays each stream is stored as, their chunks, their stored form.

cache.json's ``streams`` maps each stream to its record
(:class:`mrlcache.streams.StreamRecord`: kind, shape, ragged, frame_rate, dtype, frames of
dense frames, encoding); a cache without the key holds ``pooled`` alone
(:func:`mrlcache.streams.records_from_meta` converts). Arrays in every shard:

- ``index`` (n,) int64: the manifest row of each stored row (one chunk; HDF5 contiguous);
- a dense stream (every vector stream, and frame streams of train-mode crops):
  ``<name>`` (n, V, *shape) or (n, V, *shape, T); chunked by the record's ``chunking``:
  ``view`` (the pooled vectors), one chunk per view of all rows, so reading view v reads one
  chunk; ``rows``, a few rows of one view per chunk (about CHUNK_BYTES), so reading some
  rows reads only their chunks;
- a ragged frame stream (eval mode): ``<name>`` (*shape, total), the utterances' frames
  concatenated along time in chunks of about CHUNK_BYTES, and ``<name>_offsets`` (n + 1,)
  int64: utterance i is ``values[..., offsets[i]:offsets[i + 1]]``.

Values are stored in their record's encoding (e.g. f0's unvoiced NaN as 0, so every
stored value is finite and the writer's finiteness check keeps its meaning); the reader
decodes them.
"""

from __future__ import annotations

import math

import numpy as np

from mrlcache.streams import StreamRecord, records_from_meta

CHUNK_BYTES = 4 << 20
OFFSETS = "_offsets"
INDEX = "index"


def cache_records(meta: dict) -> dict[str, StreamRecord]:
    """{name: record} of the streams a cache holds (``pooled`` alone for caches without ``streams``)."""
    return records_from_meta(meta)


def dense_chunks(record: StreamRecord, n: int) -> tuple:
    """Chunks of a (n, V, *item) array of ``record``: one view of all rows, or of a few rows."""
    item = record.item_shape
    if record.chunking == "view":
        return (max(n, 1), 1, *item)
    itemsize = np.dtype(record.dtype).itemsize
    rows = max(1, min(max(n, 1), CHUNK_BYTES // max(1, math.prod(item) * itemsize)))
    return (rows, 1, *item)


def ragged_chunks(shape: tuple, total: int, itemsize: int) -> tuple:
    """Chunks of a (*shape, total) values array: CHUNK_BYTES of frames along time."""
    frames = max(1, min(max(total, 1), CHUNK_BYTES // max(1, math.prod(shape) * itemsize)))
    return (*shape, frames)


def expected_arrays(record: StreamRecord, n: int, views: int, offsets=None) -> dict:
    """{array: (shape, dtype, chunks)} a shard of ``n`` rows holds for ``record``
    (ragged: ``offsets`` (n + 1,) as read; None checks the offsets alone)."""
    dtype = np.dtype(record.dtype)
    if not record.ragged:
        return {record.name: ((n, views, *record.item_shape), dtype, dense_chunks(record, n))}
    out = {record.name + OFFSETS: ((n + 1,), np.dtype(np.int64), (n + 1,))}
    if offsets is not None:
        total = int(offsets[-1])
        out[record.name] = ((*record.shape, total), dtype, ragged_chunks(record.shape, total, dtype.itemsize))
    return out


def to_stored(k: int, name: str, data, dtype, utt_ids: list, offsets=None) -> np.ndarray:
    """``data`` of shard ``k`` cast to the stored ``dtype``.

    Raises ValueError naming the first utterance (``utt_ids`` of the rows) with a non-finite
    value, float16 overflow included. Rows are axis 0, or ``offsets`` along the last axis.
    """
    data = np.asarray(data)
    with np.errstate(over="ignore"):  # overflow to inf is caught just below
        stored = data.astype(dtype, copy=False)
    if offsets is None:
        bad = ~np.isfinite(stored.reshape(len(stored), -1)).all(axis=1) if len(stored) else np.zeros(0, bool)
    else:
        finite = np.isfinite(stored.reshape(-1, stored.shape[-1])).all(axis=0)  # (total,)
        bad = np.array([not finite[a:b].all() for a, b in zip(offsets[:-1], offsets[1:])], dtype=bool)
    if bad.any():
        first = utt_ids[np.flatnonzero(bad)[0]]
        overflow = np.isfinite(data).all()
        hint = " (too large for float16: extract with --dtype float32)" if overflow else ""
        what = "vectors" if offsets is None and data.ndim == 3 else f"items of stream {name}"
        raise ValueError(f"shard {k}: {int(bad.sum())} {what} are not finite, first {first!r}{hint}")
    return stored


def stored_arrays(k: int, record: StreamRecord, data, n: int, views: int, utt_ids: list) -> dict:
    """The arrays {name: (stored values, chunks)} of one stream of shard ``k`` (n rows).

    ``data``: (n, V, *item) float for a dense stream, a list of n arrays (*shape, T_i) for
    a ragged one. Raises ValueError on a wrong shape or a non-finite value.
    """
    dtype = np.dtype(record.dtype)
    if record.ragged:
        items = [np.asarray(x) for x in data]
        if len(items) != n or any(x.shape[:-1] != record.shape for x in items):
            got = [x.shape for x in items[:3]]
            raise ValueError(f"shard {k}: ragged stream {record.name} needs {n} arrays (*{record.shape}, T), "
                             f"got {len(items)}: {got}")
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([x.shape[-1] for x in items])
        values = np.concatenate(items, axis=-1) if items else np.zeros((*record.shape, 0), np.float32)
        values = to_stored(k, record.name, record.encode(values), dtype, utt_ids, offsets)
        return {record.name: (values, ragged_chunks(record.shape, values.shape[-1], dtype.itemsize)),
                record.name + OFFSETS: (offsets, (n + 1,))}
    data = np.asarray(data)
    expected = (n, views, *record.item_shape)
    if data.shape != expected:
        what = "pooled" if record.chunking == "view" else f"stream {record.name}"
        raise ValueError(f"shard {k}: {what} has shape {data.shape}, expected {expected}")
    values = to_stored(k, record.name, record.encode(data), dtype, utt_ids)
    return {record.name: (values, dense_chunks(record, n))}
