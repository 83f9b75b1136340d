"""Streams in a shard: which arrays each stream is stored as, their chunks, the f0 marker.

cache.json's ``streams`` maps each stream to ``{"kind": "vector" | "frames", "shape": [...],
"ragged": bool, "frame_rate": float | None, "dtype": "float16" | "float32"}`` (dense frame
streams add ``"frames"``, the frames of every crop). A cache without the key (every cache
written before streams existed, and every pooled-only cache) holds ``pooled`` alone, whose
array layout is unchanged. Arrays per stream, in every shard:

- ``pooled``: (n, V, D), one chunk per view (see the backends);
- other vector streams and dense frame streams (train mode): ``<name>`` (n, V, *shape) or
  (n, V, *shape, T), chunks of a few rows of one view (about CHUNK_BYTES each), so reading
  some rows reads only their chunks;
- ragged frame streams (eval mode): ``<name>`` (*shape, total) the utterances' frames
  concatenated along time, chunks of about CHUNK_BYTES along time, and ``<name>_offsets``
  (n + 1,) int64: utterance i is ``values[..., offsets[i]:offsets[i + 1]]``.

The ``f0`` stream's F0 row is NaN on unvoiced frames as the tracker gives it; it is
stored as 0 there (F0 is never below 50 Hz otherwise), so every stored value is finite and
the writer's finiteness check keeps its meaning; :func:`decode` puts the NaN back on read.
"""

from __future__ import annotations

import math

import numpy as np

CHUNK_BYTES = 4 << 20
OFFSETS = "_offsets"


def cache_streams(meta: dict) -> dict:
    """{name: info} of the streams a cache holds (``pooled`` alone for caches without ``streams``)."""
    if isinstance(meta.get("streams"), dict):
        return meta["streams"]
    return {"pooled": {"kind": "vector", "shape": [int(meta["pooled_dim"])], "ragged": False,
                       "frame_rate": None, "dtype": meta["dtype"]}}


def item_shape(info: dict) -> tuple:
    """Per-row, per-view shape of a non-ragged stream: shape, plus frames for dense frames."""
    shape = tuple(int(s) for s in info["shape"])
    return shape + (int(info["frames"]),) if info["kind"] == "frames" else shape


def dense_chunks(n: int, views: int, item: tuple, itemsize: int) -> tuple:
    """Chunks of a (n, V, *item) array: as many rows of one view as fit in CHUNK_BYTES."""
    rows = max(1, min(max(n, 1), CHUNK_BYTES // max(1, math.prod(item) * itemsize)))
    return (rows, 1, *item)


def ragged_chunks(shape: tuple, total: int, itemsize: int) -> tuple:
    """Chunks of a (*shape, total) values array: CHUNK_BYTES of frames along time."""
    frames = max(1, min(max(total, 1), CHUNK_BYTES // max(1, math.prod(shape) * itemsize)))
    return (*shape, frames)


def encode(name: str, array: np.ndarray) -> np.ndarray:
    """The stored form of a stream's values (float): f0's NaN F0 (unvoiced) becomes 0."""
    if name == "f0":
        array = np.array(array, copy=True)
        f0 = array[..., 0, :] if array.ndim >= 2 else array
        f0[np.isnan(f0)] = 0.0
    return array


def decode(name: str, array: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode`, in place: f0's stored 0 (unvoiced) is NaN again."""
    if name == "f0" and np.issubdtype(array.dtype, np.floating):
        f0 = array[..., 0, :]
        f0[f0 == 0] = np.nan
    return array


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
        what = "vectors" if name == "pooled" else f"items of stream {name}"
        raise ValueError(f"shard {k}: {int(bad.sum())} {what} are not finite, first {first!r}{hint}")
    return stored


def concat_ragged(k: int, name: str, info: dict, items, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A list of n arrays (*shape, T_i) -> (values (*shape, sum T_i) float, offsets (n + 1,) int64)."""
    shape = tuple(int(s) for s in info["shape"])
    items = [np.asarray(x) for x in items]
    if len(items) != n or any(x.shape[:-1] != shape or x.ndim != len(shape) + 1 for x in items):
        got = [x.shape for x in items[:3]]
        raise ValueError(f"shard {k}: ragged stream {name} needs {n} arrays (*{shape}, T), got {len(items)}: {got}")
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([x.shape[-1] for x in items])
    values = np.concatenate(items, axis=-1) if items else np.zeros((*shape, 0), np.float32)
    return encode(name, values), offsets
