"""Fit a head on cached streams (``--inputs layers,fbank,f0 --fusion ... --head ...``): one TrainJob.

The same loop, losses, schedules, selection, resume and run directory as the pooled fit
(:mod:`mrlcache.fit.cache_mode`, which hands over here whenever ``--inputs`` is not
``pooled`` alone or the head reads frames); the model is a
:class:`~mrlcache.models.streams.StreamModel`. A gating fit also writes
``gating.json`` / ``gating.png`` (:func:`mrlcache.fit.report.write_gating`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mrlcache.fit.config import FitError, device_for
from mrlcache.fit.heads import make_loss
from mrlcache.fit.inputs import heldout_or_external, open_features
from mrlcache.fit.loop import feature_job, train
from mrlcache.fit.rundir import finish, is_imported, meta_hash, recorded_sha256, split_and_open, write_header
from mrlcache.models import head_class
from mrlcache.models.streams import StreamInputError, StreamModel, plan_groups
from mrlcache.streams import STREAMS
from mrlcache.fit.stream_data import input_records
from mrlcache.fit.validate import raw_eer


def build_model(cfg, info: dict, device) -> StreamModel:
    """The stream model of ``cfg`` on the streams described by ``info``, initialised from ``cfg.run.seed``."""
    torch.manual_seed(cfg.run.seed)  # the model's initial weights depend on the seed only
    try:
        groups = plan_groups(cfg.head.inputs, info)
        head = cfg.head
        args = {"dims": list(head.dims), **head_class(head.name).option_args(head)}  # the width: from the streams
        return StreamModel(groups, head.name, args, fusion=head.fusion, encoder_dim=head.encoder_dim).to(device)
    except (StreamInputError, ValueError) as err:
        raise FitError(str(err)) from None


def fit_streams(cache, cache_dir, cfg, out: Path, backbone=None, resume: bool = False) -> Path:
    """Fit ``cfg`` (checked) on the streams ``cfg.head.inputs`` of an opened cache; returns ``out``."""
    where = f"--cache {cache_dir}" if cache_dir else "the cache"
    info = input_records(cache, cfg.head.inputs, where)
    meta = dict(cache.meta)
    device = device_for(cfg)
    build_model(cfg, info, "cpu")  # refuse inputs/fusion/head that do not fit before anything is written

    backbone_ref = None
    needs_backbone = any(STREAMS[s].needs_backbone for s in cfg.head.inputs if s in STREAMS)
    if cfg.run.head_only or not needs_backbone or is_imported(meta):
        backbone = None  # handcrafted streams are computed from audio without a backbone
    elif backbone is None:
        from mrlcache.backbone import backbone_for_cache

        backbone, backbone_ref = backbone_for_cache(cache_dir, meta, weights=cfg.run.weights)

    fingerprint = {"cache": str(cache_dir) if cache_dir else None, "cache_meta_sha256": meta_hash(meta),
                   "weights_sha256": recorded_sha256(meta), "model_config": meta.get("model_config"),
                   "utterances": len(cache.utterances), "views": int(cache.num_views),
                   "streams": {s: {"kind": r.kind, "shape": list(r.shape)} for s, r in info.items()}}
    speakers = np.asarray(cache.speakers)
    val_names, train_names, labels, config, lock, resume = split_and_open(cfg, speakers, cache_dir, out, resume,
                                                                          fingerprint)
    with lock:
        train_rows = np.flatnonzero(labels >= 0)
        records = input_records(cache, cfg.head.inputs, where, training=True)
        model = build_model(cfg, info, device)
        loss_fn = make_loss(cfg, len(train_names)).to(device)
        feats, plan = open_features(cache, records, labels, cfg, model, loss_fn, lambda m: m)
        val = heldout_or_external(cfg, feats, records, labels, speakers, val_names)
        fingerprint.update(train_speakers=len(train_names), val_speakers=val_names, features=plan.policy)
        write_header(out, config, fingerprint)

        job = feature_job(cfg, config, out, model, loss_fn, feats, val, len(train_rows), device)
        result = train(job, resume)
        extra = {"features": plan.policy, "inputs": list(cfg.head.inputs), "train_utterances": len(train_rows),
                 "train_speakers": len(train_names), "memory": plan.to_dict()}
        if val is not None:
            extra["raw_eer"] = raw_eer(val)
            extra["val_source"] = val.source
        best_model = finish(job, result, backbone, backbone_ref, extra, ptm=cache.meta.get("ptm"))
        if cfg.head.fusion == "gating" and best_model is not None:  # (N ranks: rank 0 has it)
            from mrlcache.fit.report import write_gating

            if val is None:  # no validation data: the gates on view 0 of the training rows
                write_gating(best_model, feats.rows(train_rows), speakers[train_rows], out, "training (view 0)")
            else:
                write_gating(best_model, val.inputs, val.speakers, out, val.source)
    return out
