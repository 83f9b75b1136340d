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


def stream_info(name: str, cfg: ExtractConfig, model, ptm) -> dict:
    """cache.json's description of one stream: kind, shape, ragged, frame_rate, dtype (+ frames)."""
    source = ptm if name == "layers" and ptm is not None else model
    per_frame = streams.spec(name).per_frame and not (name == "layers" and cfg.layers_pooled)
    info = {
        "kind": "frames" if per_frame else "vector",
        "shape": list(streams.item_shape(name, source, cfg.layers_pooled)),
        "ragged": per_frame and cfg.mode == "eval",
        "frame_rate": streams.frame_rate(name, source, SAMPLE_RATE) if per_frame else None,
        "dtype": cfg.dtype,
    }
    if per_frame and cfg.mode == "train":
        info["frames"] = streams.num_frames(name, int(round(cfg.crop_seconds * SAMPLE_RATE)), source)
    return info


def ptm_sha256(ptm) -> str:
    """SHA-256 over a PTM's state (names, then C-order tensor bytes, in key order)."""
    digest = hashlib.sha256()
    for key, value in sorted(ptm.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather(state: dict, infos: dict, views: int):
    """One shard's batches -> (pooled (n, V, D) or None, {stream: dense array or list})."""
    pooled, others = None, {}
    for name, info in infos.items():
        parts = state.get(name, [])
        if info["ragged"]:
            value = [x for part in parts for x in part]
        elif parts:
            value = np.concatenate(parts)
        else:
            value = np.zeros((0, views, *info["shape"], *([info["frames"]] if "frames" in info else [])), np.float32)
        if name == "pooled":
            pooled = value
        else:
            others[name] = value
    return pooled, others


def forward_streams(model, ptm, items, device, precision, cfg, seconds: dict) -> dict:
    """Every stream of ``cfg`` for a batch of decoded items, computed on the same views.

    Train crops (one length): {stream: (n, V, ...) float32}, one pass over all views.
    Eval utterances: {stream: list of n arrays} (ragged frames), or (n, 1, ...) vectors.
    With a ReDimNet computing both layers and pooled, pooled is finished from the layers
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
                    value, pooled = windows.layers(model, wave, window, stats=cfg.layers_pooled, with_pooled=True)
                out["pooled"] = pooled.float().cpu().numpy()
            else:
                source = ptm if name == "layers" and ptm is not None else model
                with autocast(device, precision):
                    value = streams.compute(name, wave, source, cfg.layers_pooled, window)
            out[name] = value.float().cpu().numpy()
            seconds[name] += time.perf_counter() - tick
        return out

    views = items[0].views.shape[0]
    if all(it.views.shape == items[0].views.shape for it in items) and cfg.mode == "train":
        wave = torch.from_numpy(np.concatenate([it.views for it in items])).to(device)  # (n*V, crop)
        return {name: x.reshape(len(items), views, *x.shape[1:]) for name, x in one(wave).items()}
    per_item = [one(torch.from_numpy(it.views).to(device)) for it in items]  # each (1, ...)
    result = {}
    for name in per_item[0]:
        kind_frames = streams.spec(name).per_frame and not (name == "layers" and cfg.layers_pooled)
        if kind_frames:
            result[name] = [d[name][0] for d in per_item]
        else:
            result[name] = np.stack([d[name] for d in per_item])  # (n, 1, ...)
    return result
