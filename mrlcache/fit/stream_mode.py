"""Fit a head on cached streams (``--inputs layers,fbank,f0 --fusion ... --head ...``): one TrainJob.

The same loop, losses, schedules, selection, resume and run directory as the pooled fit
(:mod:`mrlcache.fit.cache_mode`, which hands over here whenever ``--inputs`` is not
``pooled`` alone or ``--head`` is not ``mrl``); the model is a
:class:`~mrlcache.models.streams.StreamModel`. A gating fit also writes
``gating.json`` / ``gating.png`` (:func:`mrlcache.fit.report.write_gating`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mrlcache.fit.cache_mode import is_imported, recorded_sha256, split_and_open
from mrlcache.fit.config import FitError, device_for
from mrlcache.fit.heads import make_loss
from mrlcache.models.streams import StreamInputError, StreamModel, head_args, plan_groups
from mrlcache.fit.loop import feature_job, train
from mrlcache.fit.rundir import finish, meta_hash, write_header
from mrlcache.fit.stream_data import StreamFeatures, check_memory, load_streams, stream_info
from mrlcache.fit.validate import external_valset, heldout_valset, raw_eer


def build_model(cfg, info: dict, device) -> StreamModel:
    """The stream model of ``cfg`` on the streams described by ``info``, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)  # the model's initial weights depend on the seed only
    try:
        groups = plan_groups(cfg.inputs, info)
        args = head_args(cfg, 1)
        return StreamModel(groups, cfg.head, args, fusion=cfg.fusion, encoder_dim=cfg.encoder_dim).to(device)
    except (StreamInputError, ValueError) as err:
        raise FitError(str(err)) from None


def fit_streams(cache, cache_dir, cfg, out: Path, backbone=None, resume: bool = False) -> Path:
    """Fit ``cfg`` (checked) on the streams ``cfg.inputs`` of an opened cache; returns ``out``."""
    where = f"--cache {cache_dir}" if cache_dir else "the cache"
    info = stream_info(cache, cfg.inputs, where)
    meta = dict(cache.meta)
    device = device_for(cfg)
    build_model(cfg, info, "cpu")  # refuse inputs/fusion/head that do not fit before anything is written

    backbone_ref = None
    needs_backbone = bool({"layers", "pooled"} & set(cfg.inputs))
    if cfg.head_only or not needs_backbone or is_imported(meta):
        backbone = None  # handcrafted streams are computed from audio without a backbone
    elif backbone is None:
        from mrlcache.backbone import backbone_for_cache

        backbone, backbone_ref = backbone_for_cache(cache_dir, meta, weights=cfg.weights)

    fingerprint = {"cache": str(cache_dir) if cache_dir else None, "cache_meta_sha256": meta_hash(meta),
                   "weights_sha256": recorded_sha256(meta), "model_config": meta.get("model_config"),
                   "utterances": len(cache.utterances), "views": int(cache.num_views),
                   "streams": {s: {"kind": i["kind"], "shape": [int(v) for v in i["shape"]]} for s, i in info.items()}}
    speakers = np.asarray(cache.speakers)
    val_names, train_names, labels, config, lock, resume = split_and_open(cfg, speakers, cache_dir, out, resume,
                                                                          fingerprint)
    with lock:
        train_rows = np.flatnonzero(labels >= 0)
        check_memory(cache, cfg.inputs, np.dtype(cfg.feature_dtype), cfg.memory_gb, where)
        feats = StreamFeatures(load_streams(cache, cfg.inputs, np.dtype(cfg.feature_dtype), where=where),
                               labels, train_rows)
        val = None
        if cfg.val_cache is not None:
            val = external_valset(cfg.val_cache, cfg.val_trials, inputs=cfg.inputs)
        elif val_names:
            rows = np.flatnonzero(labels < 0)
            val = heldout_valset(feats.view0(rows), speakers[rows], cfg.max_val_trials, cfg.seed,
                                 f"{len(val_names)} held-out training speakers", batch=64)
        fingerprint.update(train_speakers=len(train_names), val_speakers=val_names, features="memory")
        write_header(out, config, fingerprint)

        model = build_model(cfg, info, device)
        loss_fn = make_loss(cfg, len(train_names)).to(device)
        job = feature_job(cfg, config, out, model, loss_fn, feats, val, len(train_rows), device)
        result = train(job, resume)
        extra = {"features": "memory", "inputs": list(cfg.inputs), "train_utterances": len(train_rows),
                 "train_speakers": len(train_names)}
        if val is not None:
            extra["raw_eer"] = raw_eer(val)
            extra["val_source"] = val.source
        best_model = finish(job, result, backbone, backbone_ref, extra)
        if cfg.fusion == "gating":
            from mrlcache.fit.report import write_gating

            if val is None:  # no validation data: the gates on view 0 of the training rows
                write_gating(best_model, feats.view0(train_rows), speakers[train_rows], out, "training (view 0)")
            else:
                write_gating(best_model, val.pooled, val.speakers, out, val.source)
    return out
