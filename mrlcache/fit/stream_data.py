"""The inputs of a cache fit: which cached streams a head reads, and batches of them.

:func:`input_records` is the one place a fit learns what the streams it reads are (their
:class:`~mrlcache.streams.StreamRecord`, refusing a stream the cache lacks or a ragged
one for training); the rest turns rows of streams into what a head reads: :func:`take`,
:func:`to_device` (float32) and :func:`raw_vectors` (the raw-cosine baseline).
"""

from __future__ import annotations

import numpy as np
import torch

from mrlcache.fit.config import FitError


def input_records(cache, inputs, where, training: bool = False) -> dict:
    """``cache.streams`` restricted to ``inputs`` ({name: StreamRecord}); FitError naming a
    stream the cache lacks, or (``training``) one stored ragged (an eval-mode cache)."""
    streams = cache.streams
    missing = [s for s in inputs if s not in streams]
    if missing:
        raise FitError(f"--inputs {','.join(inputs)}: {where} has no stream {missing[0]!r} (it holds "
                       f"{', '.join(streams)}); extract it with 'mrlcache extract --streams "
                       f"{','.join(sorted(set(streams) | set(inputs)))}'")
    records = {s: streams[s] for s in inputs}
    ragged = [s for s, r in records.items() if r.ragged]
    if training and ragged:
        raise FitError(f"{where}: stream {ragged[0]!r} is ragged (an eval-mode cache); fit needs a train-mode "
                       "cache of fixed-length crops ('mrlcache extract --mode train')")
    return records


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


def raw_vectors(inputs: dict, records: dict) -> np.ndarray:
    """The raw-cosine baseline's vectors (N, sum of widths) float32: each stream as its
    encoder reads it (f0 as features), frames averaged over time, concatenated."""
    from mrlcache.streams import spec

    parts = []
    for name, v in inputs.items():
        record = records[name]
        rows = [np.asarray(x, np.float32) for x in v] if isinstance(v, list) else None
        if record.kind == "vector":
            x = np.asarray(v, np.float32) if rows is None else np.stack(rows)
            parts.append(x.reshape(len(x), -1))
            continue
        if rows is None:
            x = np.asarray(v, np.float32)
            rows = [x[i] for i in range(len(x))]
        feats = [spec(name).encoder_input(torch.from_numpy(r)[None]).numpy()[0] for r in rows]
        parts.append(np.stack([f.mean(axis=-1).reshape(-1) for f in feats]))
    return np.concatenate(parts, axis=1)
