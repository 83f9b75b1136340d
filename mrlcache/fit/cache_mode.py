"""Fit a head on a feature cache: the cache's views as training data, one TrainJob.

With ``fixed_baselines`` the run also holds one fixed-size head per dim, each fitted after
the Matryoshka head as a ``--dims D`` fit into ``RUN/fixed/D`` (its own config.yaml,
history, best.pt, last.pt and a head-only model.pt): the same features in memory, the same
seed (so the same initial draws, views and batch order) and settings, validated and
selected on the same trials. Each is what ``mrlcache fit --dims D`` would give on its own.
They run one after another, not in the Matryoshka head's pass: the loop clips the gradient
norm of every parameter it steps together, and selects one best epoch, so heads sharing a
pass would not train as they do alone. What a shared pass would save is the batch gather
(the class scores dominate a step), so the baselines cost about what the separate fits do.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mrlcache import distributed
from mrlcache.fit.config import FitError, device_for, make_configs
from mrlcache.fit.heads import build_head
from mrlcache.fit.inputs import heldout_or_external, open_features, vector_input
from mrlcache.fit.loop import feature_job, train
from mrlcache.fit.rundir import (finish, is_imported, meta_hash, open_run, recorded_sha256, run_config,
                                 split_and_open, write_header)
from mrlcache.fit.stream_data import input_records
from mrlcache.fit.validate import raw_eer
from mrlcache.models import head_class


@distributed.launched
def fit(cache, dims: Sequence[int], out, *, backbone=None, resume: bool = False, **options) -> Path:
    """Fit a Matryoshka head on a feature cache; returns the run directory.

    Args:
        cache: cache directory (opened with ``mrlcache.cache.open``) or an opened Cache.
        dims: nested embedding sizes, e.g. (64, 128, 192, 256).
        out: run directory (created; an existing fit there needs ``resume=True``; locked
            while the fit writes it).
        backbone: the backbone the cache came from, for model.pt; default: resolved from the
            cache (``weights`` option, ``DIR/backbone.pt``, or the cache's recorded backbone)
            and checked against the cache's SHA-256.
        resume: continue the fit in ``out`` from ``last.pt``.
        options: any field of :class:`mrlcache.fit.config.FitConfig`.
    """
    from mrlcache.paths import check_run_dir

    cfg, _ = make_configs(dims, options)
    out = Path(out)
    check_run_dir(out)  # before the cache is read: refusing must not wait for it
    cache_dir = None
    if isinstance(cache, (str, os.PathLike)):
        from mrlcache import cache as cache_mod

        cache_dir = Path(cache)
        if not cache_dir.exists():
            raise FitError(f"--cache {cache_dir}: no such directory; run 'mrlcache extract' first")
        cache = cache_mod.open(cache_dir)
    else:
        cache_dir = Path(cache.path) if getattr(cache, "path", None) else None
    records = input_records(cache, cfg.head.inputs, f"--cache {cache_dir}")
    one_vector = len(records) == 1 and all(r.kind == "vector" and len(r.shape) == 1 for r in records.values())
    if not one_vector or head_class(cfg.head.name).reads != "vector":  # encoders, fusion or a frame head
        from mrlcache.fit.stream_mode import fit_streams

        return fit_streams(cache, cache_dir, cfg, out, backbone=backbone, resume=resume)
    meta = dict(cache.meta)
    pooled_dim = int(next(iter(records.values())).shape[0])  # the one vector stream the head reads
    if cfg.head.dims[-1] > pooled_dim:
        raise FitError(f"dims {list(cfg.head.dims)}: largest dim exceeds the cached pooled size {pooled_dim}")
    device = device_for(cfg)

    backbone_ref = None
    imported = is_imported(meta)
    if cfg.head.init == "auto":  # recorded resolved in config.yaml
        cfg.head.init = "published" if _has_published_start(cfg, meta, imported) else "random"
    if (not cfg.run.head_only or cfg.starts_from_published) and not imported and backbone is None:
        from mrlcache.backbone import backbone_for_cache

        backbone, backbone_ref = backbone_for_cache(cache_dir, meta, weights=cfg.run.weights)
    published = None
    if cfg.starts_from_published:  # the published map: the backbone's head, or imported vectors as they are
        from mrlcache.fit.adaptor import affine_of

        published = affine_of(backbone.head, pooled_dim) if backbone is not None else \
            (np.eye(pooled_dim), np.zeros(pooled_dim))
    if cfg.run.head_only or imported:
        backbone = None

    fingerprint = {"cache": str(cache_dir) if cache_dir else None, "cache_meta_sha256": meta_hash(meta),
                   "weights_sha256": recorded_sha256(meta), "model_config": meta.get("model_config"),
                   "utterances": len(cache.utterances), "views": int(cache.num_views),
                   "pooled_dim": pooled_dim}

    # Speakers: held-out ones (no external validation) give the validation trials.
    speakers = np.asarray(cache.speakers)
    val_names, train_names, labels, config, lock, resume = split_and_open(cfg, speakers, cache_dir, out, resume,
                                                                          fingerprint)
    with lock:
        train_rows = np.flatnonzero(labels >= 0)
        records = input_records(cache, cfg.head.inputs, f"--cache {cache_dir}", training=True)
        start, choose = {}, None  # TrainJob fields of a head started from the published embedding
        if published is None:
            head, loss_fn = build_head(cfg, pooled_dim, len(train_names), device)
            embed_of = lambda m: vector_input(m, cfg.head.inputs)  # noqa: E731
        else:
            head, loss_fn, embed_of, guard, choose = _published_head(cfg, cache, labels, published,
                                                                     len(train_names), device)
            start = {"score_start": True, "guard_dim": guard}
        feats, plan = open_features(cache, records, labels, cfg, head, loss_fn, embed_of)
        mode = plan.policy
        val = heldout_or_external(cfg, feats, records, labels, speakers, val_names)
        fingerprint.update(train_speakers=len(train_names), val_speakers=val_names, features=mode)
        write_header(out, config, fingerprint)  # on resume: the same, up to epochs/patience

        picked = _pick_start(choose, val, embed_of, device, resume)
        job = feature_job(cfg, config, out, head, loss_fn, feats, val, len(train_rows), device,
                          embed=embed_of(head))
        job = dataclasses.replace(job, **start)
        result = train(job, resume)
        refit = published is not None and result["best"]["epoch"] == -1 and bool(val_names) and \
            _refit_start(job, cfg, cache, speakers, published, picked)
        extra = {"features": mode, "train_utterances": len(train_rows), "train_speakers": len(train_names),
                 "memory": plan.to_dict(), **({"start_pick": picked} if picked else {}),
                 **({"start_refit_on_every_speaker": True} if refit else {})}
        if val is not None:
            extra["raw_eer"] = raw_eer(val)
            extra["val_source"] = val.source
        finish(job, result, backbone, backbone_ref, extra, ptm=meta.get("ptm"))
        if cfg.run.fixed_baselines:
            for i, d in enumerate(cfg.head.dims):
                _fit_fixed(cfg, i, out / "fixed" / str(d), cache_dir, fingerprint, feats, val, pooled_dim,
                           len(train_names), len(train_rows), device, resume, extra)
    return out


def _has_published_start(cfg, meta: dict, imported: bool) -> bool:
    """``--init auto``: start from the published embedding when there is one worth starting from
    (imported vectors, or a cache of trained encoder weights, not random ones, without
    --head-only, which says the vectors come from no known backbone) and the head can (one
    that supports it, on the pooled vector); measured better than a head from random on the
    imported and on two real encoders' vectors (benchmarks/README.md, issue 21)."""
    from mrlcache.backbone import BackboneRecord, RecordError
    from mrlcache.models import head_supports
    from mrlcache.streams import pooled_only

    head = cfg.head
    if "published_start" not in head_supports(head.name) or not pooled_only(head.inputs) or meta.get("ptm"):
        return False
    if imported:
        return True
    if cfg.run.head_only:
        return False
    try:
        record = BackboneRecord.from_meta(meta)
    except RecordError:
        return False
    return record is not None and not record.is_random


def _fit_fixed(cfg, i, out: Path, cache_dir, fingerprint, feats, val, pooled_dim, num_classes, num_train, device,
               resume, extra) -> None:
    """The fixed-size head of ``cfg.head.dims[i]``: a one-dim fit into ``out`` (resumed if it has a last.pt)."""
    margin = cfg.loss.margin if cfg.loss.margins is None else cfg.loss.margins[i]
    one = dataclasses.replace(
        cfg, head=dataclasses.replace(cfg.head, dims=(cfg.head.dims[i],), init="random", objective="margin"),
        loss=dataclasses.replace(cfg.loss, dim_weights=None, margins=None, margin=margin, grad_scaling=False),
        run=dataclasses.replace(cfg.run, fixed_baselines=False, head_only=True))
    config = run_config(one, cache_dir=cache_dir)
    lock, resume = open_run(out, config, resume and (out / "last.pt").exists(), fingerprint)
    with lock:
        write_header(out, config, fingerprint)
        head, loss_fn = build_head(one, pooled_dim, num_classes, device)
        job = feature_job(one, config, out, head, loss_fn, feats, val, num_train, device,
                          embed=vector_input(head, one.head.inputs))
        finish(job, train(job, resume), None, None, extra)


def _published_head(cfg, cache, labels, published, num_classes, device):
    """A head started from the published embedding (:mod:`mrlcache.fit.adaptor`): (head, loss,
    embed_of, guard_dim, choose); the training forward reads {"pooled": (b, P)} batches."""
    from mrlcache.fit.adaptor import build_nested

    pooled, rows_labels = training_sample(cache, labels, cfg.run.seed)
    try:
        head, loss_fn, embed_maker, guard, choose = build_nested(cfg, pooled.shape[1], num_classes, published,
                                                                 pooled, rows_labels, device)
    except ValueError as err:
        raise FitError(str(err)) from None
    return head, loss_fn, lambda m: (lambda batch, f=embed_maker(m): f(batch["pooled"])), guard, choose


def _pick_start(choose, val, embed_of, device, resume: bool) -> dict | None:
    """``--init-rotation auto``: every start scored on the validation trials, the best kept
    (:func:`mrlcache.fit.adaptor.pick_start`); None when there is one start. Without
    validation the first (pca) is kept; a resumed fit reads its start from last.pt."""
    if choose is None or val is None or resume:
        return None
    from mrlcache.fit.validate import validate

    def score(h):
        h.eval()
        return {str(d): float(e) for d, e in validate(embed_of(h), val, h.dims, device)["eer"].items()}

    picked = distributed.from_main(lambda: choose(score), "scoring the starts")
    if not distributed.is_main():
        choose(None, picked["kept"])
    return picked


def _refit_start(job, cfg, cache, speakers, published, picked) -> bool:
    """Epoch 0 selected after validating on held-out speakers: the start fitted again on every
    training speaker (held-out ones too, as ``eer --baseline pca|lda`` fits on the whole
    training cache), written into best.pt (so model.pt is that start). False for an adaptor."""
    from mrlcache.fit.adaptor import start_maps
    from mrlcache.fit.loop import load_checkpoint
    from mrlcache.runtime import atomic_torch_save

    if job.cfg.head.objective != "margin":
        return False  # the adaptor's rotation is kept as validated (its full-size scores do not move)
    kind = picked["kept"] if picked else cfg.head.init_rotation
    if kind == "auto":
        kind = "pca"
    _, every = np.unique(speakers, return_inverse=True)
    pooled, labels = training_sample(cache, every, cfg.run.seed)
    job.head.set_map(*start_maps(cfg, published, pooled, labels, (kind,))[kind])
    if distributed.is_main():
        state = load_checkpoint(job.out / "best.pt")
        state["head"] = job.head.state_dict()
        atomic_torch_save(state, job.out / "best.pt")
    return True


SAMPLE_ROWS = 50_000  # training vectors that fit the start's rotation, standardisation and classifier


def training_sample(cache, labels: np.ndarray, seed: int):
    """Training vectors (n, P) float32, every view, and their classes (n,); a seeded sample of
    the utterances when they hold more than SAMPLE_ROWS vectors."""
    rows = np.flatnonzero(labels >= 0)
    views = int(cache.num_views)
    if len(rows) * views > SAMPLE_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, SAMPLE_ROWS // views, replace=False))
    pooled = np.concatenate([cache.read("pooled", view=v, rows=rows, dtype=np.float32) for v in range(views)])
    return pooled, np.tile(labels[rows], views)
