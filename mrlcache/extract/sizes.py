"""Honest sizes before work starts: each requested stream's projected cache size for a corpus.

Dense streams (every vector stream, frames of train-mode crops) are exact: rows x views x
the record's item bytes. Ragged frames (eval mode) scale with the audio: the corpus's
seconds are estimated from the headers of up to ``SAMPLE`` files spread over the list
(capped by ``--max-seconds``). :func:`check_free_disk` refuses, in one line, a cache that
would not fit the free disk of ``--out``, naming what makes it smaller.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mrlcache import streams
from mrlcache.audio import SAMPLE_RATE, AudioError, audio_info
from mrlcache.extract.config import ExtractError

SAMPLE = 64
GB = 1e9


def stream_records(cfg, model, ptm) -> dict:
    """{stream: StreamRecord} extract writes for ``cfg`` with this backbone / PTM."""
    crop = int(round(cfg.views.crop_seconds * SAMPLE_RATE)) if cfg.views.mode == "train" else None
    out = {}
    for name in cfg.stream_names:
        out[name] = streams.spec(name).record(streams.source(name, model, ptm), layers_pooled=cfg.storage.layers_pooled,
                                             dtype=cfg.storage.dtype, crop_samples=crop, sample_rate=SAMPLE_RATE)
    return out


def estimated_seconds(utterances, max_seconds: float | None) -> float:
    """Audio seconds of ``utterances``, from the headers of up to SAMPLE of them (unreadable ones count 0)."""
    if not utterances:
        return 0.0
    picks = np.unique(np.linspace(0, len(utterances) - 1, min(SAMPLE, len(utterances))).astype(int))
    seconds = []
    for i in picks:
        try:
            rate, frames, _ = audio_info(utterances[i].path)
            s = frames / rate if frames else 0.0
        except (AudioError, OSError):
            s = 0.0
        seconds.append(min(s, max_seconds) if max_seconds else s)
    return float(np.mean(seconds)) * len(utterances)


def projected_sizes(utterances, cfg, model, ptm) -> dict[str, int]:
    """{stream: bytes} the cache of ``utterances`` will hold (shards only; ragged streams estimated)."""
    records = stream_records(cfg, model, ptm)
    n, views = len(utterances), int(cfg.views.count)
    seconds = None
    sizes = {}
    for name, record in records.items():
        if not record.ragged:
            sizes[name] = n * record.row_bytes(views)
            continue
        if seconds is None:
            seconds = estimated_seconds(utterances, cfg.views.max_seconds)
        frames = record.frame_rate * seconds
        sizes[name] = int(frames * record.row_bytes(1) + 8 * (n + 1))  # values + offsets
    return sizes


def describe(sizes: dict) -> str:
    return ", ".join(f"{name} {size / GB:.3g} GB" for name, size in sizes.items())


def check_free_disk(out, sizes: dict, cfg, present: int = 0) -> None:
    """ExtractError (one line) when the projected cache, less ``present`` bytes already
    written, exceeds the free disk space where ``out`` lives."""
    where = Path(out).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    need = sum(sizes.values()) - present
    if need <= free:
        return
    hints = []
    if any(streams.spec(name).poolable for name in sizes) and not cfg.storage.layers_pooled:
        hints.append("--layers-pooled (per-layer mean and std instead of frames)")
    if cfg.views.count > 1:
        hints.append(f"fewer --views (now {cfg.views.count})")
    hints.append("fewer --streams or another --out")
    raise ExtractError(f"{out}: the cache needs about {need / GB:.3g} GB more ({describe(sizes)}) but "
                       f"{free / GB:.3g} GB are free on its disk; use {', or '.join(hints)}")
