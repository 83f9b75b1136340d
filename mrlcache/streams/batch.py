"""Extract's side of the streams: their cache.json descriptions and one batch's values.

:func:`forward_streams` computes every requested stream on the same views (crops or
whole utterances) the backbone sees, so handcrafted frames line up with the layers;
:func:`gather` turns a shard's batches into what ``CacheWriter.write_shard`` takes.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from mrlcache import streams
from mrlcache.audio import SAMPLE_RATE
from mrlcache.runtime import autocast
from mrlcache.streams import windows


def stream_info(name: str, cfg, model, ptm) -> dict:
    """cache.json's record of one stream (:meth:`mrlcache.streams.StreamSpec.record`, as JSON)."""
    source = streams.source(name, model, ptm)
    crop = int(round(cfg.views.crop_seconds * SAMPLE_RATE)) if cfg.views.mode == "train" else None
    record = streams.spec(name).record(source, layers_pooled=cfg.storage.layers_pooled, dtype=cfg.storage.dtype,
                                       crop_samples=crop, sample_rate=SAMPLE_RATE)
    return record.to_json()


def ptm_sha256(ptm) -> str:
    """SHA-256 over a PTM's state (names, then C-order tensor bytes, in key order)."""
    digest = hashlib.sha256()
    for key, value in sorted(ptm.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather(state: dict, infos: dict, views: int) -> dict:
    """One shard's batches -> {stream: dense array or list}, what ``CacheWriter.write_shard`` takes."""
    out = {}
    for name, info in infos.items():
        record = streams.record_from_json(name, info)
        parts = state.get(name, [])
        if record.ragged:
            out[name] = [x for part in parts for x in part]
        elif parts:
            out[name] = np.concatenate(parts)
        else:
            out[name] = np.zeros((0, views, *record.item_shape), np.float32)
    return out


def forward_streams(model, ptm, items, device, precision, cfg, seconds: dict) -> dict:
    """Every stream of ``cfg`` for a batch of decoded items, computed on the same views.

    Train crops (one length): {stream: (n, V, ...) float32}, one pass over all views.
    Eval utterances: {stream: list of n arrays} (ragged frames), or (n, 1, ...) vectors;
    one pass when all have the same length (eval's buckets: nothing is padded, each row as
    it would be alone up to float rounding), else one pass each.
    With a backbone computing both layers and pooled, pooled is finished from the layers
    (one backbone pass; equal to ``model.pooled``).
    """
    window = cfg.eval_window

    def one(wave):  # (B, T) -> {stream: (B, ...) float32 numpy}
        out = {}
        shared = "pooled" in cfg.stream_names and "layers" in cfg.stream_names and ptm is None
        for name in cfg.stream_names:
            tick = time.perf_counter()
            if name == "pooled" and shared:
                continue  # computed with layers
            if name == "layers" and shared:
                with autocast(device, precision):
                    value, pooled = windows.layers(model, wave, window, stats=cfg.storage.layers_pooled, with_pooled=True)
                out["pooled"] = pooled.float().cpu().numpy()
            else:
                source = streams.source(name, model, ptm)
                with autocast(device, precision):
                    value = streams.compute(name, wave, source, cfg.storage.layers_pooled, window)
            out[name] = value.float().cpu().numpy()
            seconds[name] += time.perf_counter() - tick
        return out

    views = items[0].views.shape[0]
    if all(it.views.shape == items[0].views.shape for it in items):
        wave = torch.from_numpy(np.concatenate([it.views for it in items])).to(device)  # (n*V, crop or T)
        batched = {name: x.reshape(len(items), views, *x.shape[1:]) for name, x in one(wave).items()}
        if cfg.views.mode == "train":
            return batched
        per_item = [{name: x[i] for name, x in batched.items()} for i in range(len(items))]  # each (1, ...)
    else:
        per_item = [one(torch.from_numpy(it.views).to(device)) for it in items]  # each (1, ...)
    result = {}
    for name in per_item[0]:
        if streams.spec(name).is_frames(cfg.storage.layers_pooled):
            result[name] = [d[name][0] for d in per_item]
        else:
            result[name] = np.stack([d[name] for d in per_item])  # (n, 1, ...)
    return result
