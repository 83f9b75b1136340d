"""Training inputs on cached streams (``--inputs`` other than ``pooled`` alone), in memory.

A train-mode cache holds every stream densely, (N, V, *shape[, T]) with fixed-length
crops, so a batch is one gather per stream. Each epoch draws one view per row and an
order exactly as :class:`mrlcache.fit.data.MemoryFeatures` does (the same generator, the
same draws), so resume and determinism hold the same way. Validation reads view 0.

:func:`load_streams` is the one place that reads a cache's streams (the reader contract of
``mrlcache.cache``: ``cache.streams``, ``cache.read(stream, view, rows, dtype)``).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from mrlcache import distributed
from mrlcache.fit.config import FitError
from mrlcache.fit.data import epoch_generator


def stream_info(cache, inputs, where) -> dict:
    """``cache.streams`` restricted to ``inputs``; FitError naming a stream the cache lacks."""
    streams = dict(getattr(cache, "streams", None) or {"pooled": {"kind": "vector", "shape": (int(cache.dim),),
                                                               "ragged": False, "frame_rate": None}})
    missing = [s for s in inputs if s not in streams]
    if missing:
        raise FitError(f"--inputs {','.join(inputs)}: {where} has no stream {missing[0]!r} (it holds "
                       f"{', '.join(streams)}); extract it with 'mrlcache extract --streams "
                       f"{','.join(sorted(set(streams) | set(inputs)))}'")
    return {s: streams[s] for s in inputs}


def check_memory(cache, inputs, dtype, memory_gb, where="the cache") -> float:
    """GB the streams ``inputs`` take in memory as ``dtype``; FitError beyond the budget
    (``memory_gb``, None: half the available memory). Reads one row per stream to learn T."""
    from mrlcache.fit.data import available_gb

    per_row = 0
    for name in inputs:
        first = np.asarray(cache.read(name, rows=np.array([0]), dtype=dtype)[0])  # (V, *shape[, T])
        per_row += first.size
    need = per_row * len(cache.utterances) * np.dtype(dtype).itemsize / 2**30
    budget = memory_gb if memory_gb is not None else available_gb() / 2
    if need > budget:
        raise FitError(f"{where}: streams {','.join(inputs)} take {need:.3g} GB in memory, over the "
                       f"{budget:.3g} GB budget (--memory-gb); fits on streams hold them in memory: use "
                       "--feature-dtype float16, fewer --inputs, or a cache extracted with --layers-pooled")
    return need


def load_streams(cache, inputs, dtype, view=None, rows=None, where="the cache") -> dict:
    """The streams ``inputs`` of ``cache``: {name: (N, V, *shape[, T]) or, for one view, (N, ...)}.

    Ragged (eval-mode) frame streams come as lists of (*shape, T_i) arrays; training refuses them.
    """
    info = stream_info(cache, inputs, where)
    out = {}
    for name in inputs:
        out[name] = cache.read(name, view=view, rows=rows, dtype=dtype)
        if info[name].get("ragged") and view is None:
            raise FitError(f"{where}: stream {name!r} is ragged (an eval-mode cache); fit needs a train-mode "
                           "cache of fixed-length crops ('mrlcache extract --mode train')")
    return out


def take(inputs: dict, rows) -> dict:
    """Rows of every stream: arrays indexed, ragged lists stacked (equal lengths, or one row)."""
    out = {}
    for name, v in inputs.items():
        if isinstance(v, list):
            idx = range(len(v))[rows] if isinstance(rows, slice) else rows
            out[name] = np.stack([v[i] for i in idx])
        else:
            out[name] = v[rows]
    return out


def num_rows(inputs: dict) -> int:
    return len(next(iter(inputs.values())))


def to_device(batch: dict, device) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(device) for k, v in batch.items()}


def raw_vectors(inputs: dict) -> np.ndarray:
    """The raw-cosine baseline's vectors: each stream averaged over time (f0 as features), concatenated."""
    from mrlcache.streams import f0_features

    parts = []
    for name, v in inputs.items():
        rows = [np.asarray(x, np.float32) for x in v] if isinstance(v, list) else None
        if rows is None:
            x = np.asarray(v, np.float32)
            rows = [x[i] for i in range(len(x))]
        if name == "f0":
            rows = [f0_features(torch.from_numpy(r)[None]).numpy()[0] for r in rows]
        frames = name != "pooled" and rows[0].ndim >= 2 and not (name == "layers" and rows[0].ndim == 2)
        parts.append(np.stack([(r.mean(axis=-1) if frames else r).reshape(-1) for r in rows]))
    return np.concatenate(parts, axis=1)


class StreamFeatures:
    """Every view of every stream in memory; each epoch gathers one view per training row."""

    def __init__(self, arrays: dict, labels: np.ndarray, train_rows: np.ndarray):
        self.arrays = arrays  # name -> (N, V, *shape[, T])
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.train_rows = train_rows
        self.num_views = next(iter(arrays.values())).shape[1]

    def view0(self, rows) -> dict:
        """View 0 of ``rows`` (validation inputs), float32."""
        return {k: np.ascontiguousarray(v[rows, 0], dtype=np.float32) for k, v in self.arrays.items()}

    def epoch(self, seed: int, epoch: int, batch_size: int, device) -> Iterator[tuple[dict, torch.Tensor]]:
        """Yield ({stream: (b, *shape[, T]) float32 on device}, labels (b,)) covering every training row once."""
        g = epoch_generator(seed, epoch)  # the draws of MemoryFeatures.epoch, in the same order
        views = torch.randint(self.num_views, (len(self.labels),), generator=g).numpy()
        order = self.train_rows[torch.randperm(len(self.train_rows), generator=g).numpy()]
        for rows in distributed.rank_batches(order, batch_size):  # this rank's rows of each batch
            batch = {k: v[rows, views[rows]] for k, v in self.arrays.items()}
            yield to_device(batch, device), self.labels[rows].to(device)
