"""The typed record of one stored stream, as cache.json holds it (no torch here).

A :class:`StreamRecord` says what one stream of a cache is: its name, kind (``vector``
per utterance or ``frames`` over time), per-item shape, frame rate, stored dtype, whether
its frames are ragged (eval mode) or dense crops of ``frames`` frames (train mode), how
its values are encoded on disk, and how its arrays are chunked. cache.json stores
``{"streams": {name: record.to_json()}}``; :func:`mrlcache.streams.records_from_meta` is the one place that
reads it back, old caches included (no ``streams`` key: pooled alone; no ``encoding`` or
``chunking``: the stream's own defaults, see :data:`mrlcache.streams.STREAMS`).

Encodings (``ENCODINGS``) map a stored form to the values a stream computes, e.g.
``"nan-as-zero"``: NaN in channel 0 (F0 on unvoiced frames) is stored as 0, so every stored
value is finite and the writer's finiteness check keeps its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("vector", "frames")
# How a stream's dense arrays are chunked: "view", one chunk per view of all a shard's
# rows (reading view v reads one chunk: the pooled vectors' layout since the first cache);
# "rows", chunks of a few rows of one view (reading some rows reads only their chunks).
CHUNKINGS = ("view", "rows")


def _nan_as_zero_encode(array: np.ndarray) -> np.ndarray:
    import numpy as np  # on first use: streams is read by the torch- and numpy-free CLI

    array = np.array(array, copy=True)
    first = array[..., 0, :]
    first[np.isnan(first)] = 0.0
    return array


def _nan_as_zero_decode(array: np.ndarray) -> np.ndarray:
    import numpy as np  # on first use: streams is read by the torch- and numpy-free CLI

    if np.issubdtype(array.dtype, np.floating):
        first = array[..., 0, :]
        first[first == 0] = np.nan
    return array


# encoding name -> (encode: computed values -> stored form (a copy), decode: in place)
ENCODINGS = {"nan-as-zero": (_nan_as_zero_encode, _nan_as_zero_decode)}


@dataclass(frozen=True)
class StreamRecord:
    """One stream of a cache. ``shape`` is per utterance and view, without the time axis."""

    name: str
    kind: str
    shape: tuple
    dtype: str
    frame_rate: float | None = None
    ragged: bool = False
    frames: int | None = None  # frames of every crop (dense frame streams)
    encoding: str | None = None
    chunking: str = field(default="rows", compare=True)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.kind not in KINDS or self.chunking not in CHUNKINGS:
            raise ValueError(f"stream {self.name!r}: kind {self.kind!r} / chunking {self.chunking!r} unknown")
        if self.encoding is not None and self.encoding not in ENCODINGS:
            raise ValueError(f"stream {self.name!r}: unknown encoding {self.encoding!r}")
        if self.kind == "frames" and not self.ragged and self.frames is None:
            raise ValueError(f"stream {self.name!r}: dense frames need a frame count")

    @property
    def is_frames(self) -> bool:
        return self.kind == "frames"

    @property
    def item_shape(self) -> tuple:
        """Shape of one row's one view as stored densely: shape, plus the frames of dense frames."""
        return self.shape + ((int(self.frames),) if self.kind == "frames" and not self.ragged else ())

    def row_bytes(self, views: int = 1, itemsize: int | None = None) -> int:
        """Bytes of one row (``views`` views) of a dense stream, in the stored dtype or ``itemsize``."""
        import numpy as np  # on first use: streams is read by the torch- and numpy-free CLI

        size = itemsize if itemsize is not None else np.dtype(self.dtype).itemsize
        return int(np.prod(self.item_shape, dtype=np.int64)) * size * views

    def encode(self, array: np.ndarray) -> np.ndarray:
        """Computed values -> their stored form (float, before the cast to ``dtype``)."""
        return ENCODINGS[self.encoding][0](array) if self.encoding else array

    def decode(self, array: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`encode`, in place on a float array; returns it."""
        return ENCODINGS[self.encoding][1](array) if self.encoding else array

    def to_json(self) -> dict:
        """cache.json's form: kind, shape, ragged, frame_rate, dtype (+ frames, + encoding)."""
        out = {"kind": self.kind, "shape": list(self.shape), "ragged": bool(self.ragged),
               "frame_rate": self.frame_rate, "dtype": self.dtype}
        if self.frames is not None:
            out["frames"] = int(self.frames)
        if self.encoding is not None:
            out["encoding"] = self.encoding
        return out
