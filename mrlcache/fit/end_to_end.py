"""Fit a head (and optionally the backbone) on audio: crops decoded on the fly, one TrainJob.

Each epoch every training utterance contributes view ``v`` of ``views``, drawn exactly as
the cache mode draws cached views, and the crop is the one ``mrlcache extract`` would make
for (seed, utt_id, v): with a frozen backbone the two modes see the same data. Files that
give no usable wave are left out and listed once in ``RUN/skipped.tsv``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from mrlcache import distributed
from mrlcache.backbone.registry import wave_minimum
from mrlcache.fit.config import FitError, device_for, make_configs
from mrlcache.fit.data import epoch_generator
from mrlcache.fit.heads import build_head
from mrlcache.fit.loop import TrainJob, train
from mrlcache.fit.optim import make_optimizer, make_scheduler, param_groups
from mrlcache.fit.rundir import SkipLog, finish, meta_hash, open_run, run_config, write_header
from mrlcache.fit.validate import heldout_valset, split_speakers
from mrlcache.paths import check_run_dir
from mrlcache.workers import die_with_parent, surviving_workers


@distributed.launched
def fit_end_to_end(data, dims: Sequence[int], out, *, resume: bool = False, **options) -> Path:
    """Fit the head (and optionally the backbone) on audio crops; returns the run directory.

    The same head, loss, schedule, validation (held-out speakers, clean view-0 crops) and
    run files as :func:`mrlcache.fit.fit`.

    Args:
        data: VoxCeleb-style tree (``mrlcache.corpus.scan_tree``).
        dims: nested embedding sizes.
        out: run directory (locked while the fit writes it).
        resume: continue the fit in ``out`` from ``last.pt``.
        options: any field of :class:`~mrlcache.fit.config.FitConfig` or
            :class:`~mrlcache.fit.config.EndToEndConfig`: the backbone (``variant``,
            ``weights`` or ``random_init`` with a variant), ``crop_seconds``, ``views``,
            ``augment`` (AugmentConfig) as ``mrlcache extract``; ``workers``;
            ``unfreeze_after`` / ``backbone_lr``; ``grad_accum``; ``min_seconds``.

    Files that give no usable wave (unreadable, empty, truncated, silent, too short) are
    left out of training and validation, each listed once in ``RUN/skipped.tsv`` and
    counted in ``summary.json``; the fit goes on.
    """
    from mrlcache.corpus import scan_tree
    from mrlcache.backbone import load_backbone, save_checkpoint, state_sha256

    cfg, e2e = make_configs(dims, {**options, "data": str(data)}, end_to_end=True)
    out = Path(out)
    check_run_dir(out)  # before any audio is scanned
    device = device_for(cfg)
    utts = scan_tree(data)
    if not utts:
        raise FitError(f"--data {data}: no audio files found")
    if e2e.random_init:
        backbone = load_backbone(e2e.variant, random_init=True, seed=cfg.run.seed)
    else:
        backbone = load_backbone(cfg.run.weights or e2e.variant, train_type=e2e.train_type, dataset=e2e.dataset)
    backbone_ref = None if e2e.random_init else {
        "source": str(Path(cfg.run.weights).resolve()) if cfg.run.weights else e2e.variant,
        "train_type": e2e.train_type, "dataset": e2e.dataset}
    if cfg.head.dims[-1] > backbone.pooled_dim:
        raise FitError(f"dims {list(cfg.head.dims)}: largest dim exceeds the backbone's pooled size "
                       f"{backbone.pooled_dim}")
    need, who = wave_minimum(backbone)
    if int(round(e2e.crop_seconds * 16000)) < need:
        raise FitError(f"--crop-seconds {e2e.crop_seconds:g}: {who} needs at least {need} samples "
                       f"({need / 16000:g} s); give a longer one")
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)

    speakers = np.array([u.speaker for u in utts])
    val_names, train_names, labels, cfg.val.val_speakers = split_speakers(speakers, cfg.val.val_speakers,
                                                                          cfg.run.seed, str(data))
    train_rows = np.flatnonzero(labels >= 0)

    # Backbone identity for the fingerprint: the file's SHA-256, or the random weights' bytes.
    sha = backbone.weights_sha256 or state_sha256(backbone)
    root = str(Path(data).resolve())
    fingerprint = {"data": root, "utterances": len(utts), "weights_sha256": sha,
                   "model_config": backbone.model_config, "pooled_dim": backbone.pooled_dim,
                   "cache_meta_sha256": meta_hash({"data": root, "utts": len(utts), "sha": sha,
                                                   **e2e.identity(cfg.run.weights)}),
                   "train_speakers": len(train_names), "val_speakers": val_names, "features": "end-to-end"}
    config = run_config(cfg, e2e)
    lock, resume = open_run(out, config, resume, fingerprint)
    with lock:
        write_header(out, config, fingerprint)
        if e2e.random_init and not resume and distributed.is_main():
            save_checkpoint(backbone, out / "backbone.pt")  # the weights the run started from
        skips = SkipLog(out / "skipped.tsv", resume)
        job = _job(cfg, e2e, config, out, device, backbone, utts, speakers, labels, train_rows,
                   len(train_names), len(val_names), skips)
        result = train(job, resume)
        skips.sync()  # the files other ranks left out, into rank 0's skipped.tsv
        extra = {"features": "end-to-end", "train_utterances": len(train_rows), "train_speakers": len(train_names),
                 "skipped": len(skips.reasons), "skipped_by_reason": skips.by_reason()}
        finish(job, result, backbone, backbone_ref, extra)
    if skips.reasons and distributed.is_main():
        reasons = ", ".join(f"{r}: {n}" for r, n in extra["skipped_by_reason"].items())
        print(f"skipped {len(skips.reasons)} of {len(utts)} utterances with no usable audio ({reasons}); "
              f"listed in {out / 'skipped.tsv'}", file=sys.stderr)
    return out


def _worker_init(parent: int, _worker_id: int) -> None:
    die_with_parent(parent)  # a killed fit must not leave its decoding workers running


def _job(cfg, e2e, config, out, device, backbone, utts, speakers, labels, train_rows, num_classes, num_val,
         skips) -> TrainJob:
    """The end-to-end TrainJob: crops through the backbone, then the head."""
    paths = [u.path for u in utts]
    ids = [u.utt_id for u in utts]
    crop = int(round(e2e.crop_seconds * 16000))

    def loader(items):
        # The cache mode's batch boundaries (a lone last crop joins the previous batch); on
        # N ranks this rank's part of each global batch, decoded by this rank's workers.
        slices = [rows.tolist() for rows in distributed.rank_batches(np.arange(len(items)), cfg.optim.batch_size)]
        ds = _CropDataset(paths, ids, items, cfg.run.seed, crop, e2e.augment, e2e.min_seconds)
        return torch.utils.data.DataLoader(ds, batch_sampler=slices, num_workers=e2e.workers,
                                           worker_init_fn=functools.partial(_worker_init, os.getpid()))

    labels_t = torch.from_numpy(labels)

    def batches(epoch):
        # The cache mode's draw: one view per utterance, then a permutation of training rows.
        # Bad files stay in the draw (so the draw does not depend on what failed before) and
        # are dropped from their batch each epoch; recorded once.
        g = epoch_generator(cfg.run.seed, epoch)
        v = torch.randint(e2e.views, (len(utts),), generator=g).numpy()
        order = train_rows[torch.randperm(len(train_rows), generator=g).numpy()]
        crops = surviving_workers(loader(np.stack([order, v[order]], 1)), FitError,
                                  "last.pt keeps the last finished epoch: resume with --resume, with fewer "
                                  "--workers if memory is short")
        for wave, rows in _readable_batches(crops, lambda row, r, d: skips.add(ids[row], r, d),
                                            merge=distributed.world() == 1):
            yield wave.to(device), labels_t[rows].to(device)

    head, loss_fn = build_head(cfg, backbone.pooled_dim, num_classes, device)
    groups = param_groups([head, loss_fn], cfg)
    if e2e.unfreeze_after is not None:
        # Backbone groups exist from the start with their own lr; frozen parameters have no
        # gradient, so the optimiser skips them until unfreezing.
        groups += param_groups([backbone], cfg, lr=e2e.backbone_lr)
    opt = make_optimizer(cfg, groups)
    n_batches = distributed.num_batches(len(train_rows), cfg.optim.batch_size)
    opt_steps = math.ceil(n_batches / e2e.grad_accum)

    state = {"unfrozen": False}

    def on_epoch_start(epoch):
        skips.sync()
        if e2e.unfreeze_after is not None and epoch >= e2e.unfreeze_after and not state["unfrozen"]:
            for p in backbone.parameters():
                p.requires_grad_(True)
            state["unfrozen"] = True
        backbone.train(state["unfrozen"])

    def embed(wave):
        if state["unfrozen"]:
            return head(backbone.pooled(wave))
        with torch.no_grad():
            pooled = backbone.pooled(wave)
        return head(pooled)

    val = None
    val_rows = np.flatnonzero(labels < 0)
    val_set = _CropDataset(paths, ids, np.stack([val_rows, np.zeros_like(val_rows)], 1), cfg.run.seed, crop, None,
                           e2e.min_seconds)
    val_items = [val_set[k] for k in range(len(val_set))]  # clean view-0 crops
    for wave, row, reason, detail in val_items:
        if reason:
            skips.add(ids[row], reason, detail)
    val_rows = np.array([row for _, row, reason, _ in val_items if not reason], np.int64)
    if len(val_rows):
        val_waves = np.stack([wave.numpy() for wave, _, reason, _ in val_items if not reason])  # (N, S)
        val = heldout_valset({"wave": val_waves}, speakers[val_rows], cfg.val.max_val_trials, cfg.run.seed,
                             f"{num_val} held-out speakers, clean {e2e.crop_seconds}s crops", batch=32)

    def val_embed(batch):
        backbone.eval()
        emb = head(backbone.pooled(batch["wave"]))
        backbone.train(state["unfrozen"])
        return emb

    return TrainJob(cfg=cfg, config=config, out=out, head=head, loss_fn=loss_fn, batches=batches, embed=embed,
                    val_embed=val_embed, val=val, steps_per_epoch=n_batches, device=device, optimizer=opt,
                    scheduler=make_scheduler(cfg, opt, opt_steps),
                    modules={"backbone": backbone} if e2e.unfreeze_after is not None else {},
                    on_epoch_start=on_epoch_start, grad_accum=e2e.grad_accum)


class _CropDataset(torch.utils.data.Dataset):
    """One crop per (utterance, view) pair of an epoch, decoded and augmented in the worker.

    An item is (crop (S,) float32, row, reason, detail); a file that gives no usable wave
    (``mrlcache.audio.AudioError``, or shorter than ``min_seconds`` / silent, as extract
    checks) is an all-zero crop with its AudioError reason and detail, for the training loop
    to drop and record: one bad file must not stop a long run.
    """

    def __init__(self, paths, utt_ids, items, seed, crop_samples, augment_config, min_seconds):
        self.paths, self.utt_ids, self.items = paths, utt_ids, items  # items: (K, 2) rows, views
        self.seed, self.crop_samples, self.augment_config = seed, crop_samples, augment_config
        self.min_seconds = min_seconds
        self._augmenter = None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        from mrlcache.audio import AudioError, check_wave, load_audio
        from mrlcache.augment import Augmenter, make_view

        if self._augmenter is None and self.augment_config is not None:
            self._augmenter = Augmenter(self.augment_config)  # one per worker: lists files once
        row, view = (int(v) for v in self.items[k])
        try:
            wave = load_audio(self.paths[row])  # (T,)
            check_wave(wave, self.paths[row], self.min_seconds)
        except AudioError as err:
            return torch.zeros(self.crop_samples), row, err.reason, err.detail
        crop = make_view(wave, self.utt_ids[row], view, seed=self.seed, crop_samples=self.crop_samples,
                         augmenter=self._augmenter)  # (S,)
        return torch.from_numpy(crop), row, "", ""


def _readable_batches(batches, skip, merge: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Drop the failed crops of each batch: (wave, rows, reasons, details) -> (wave, rows).

    ``skip(row, reason, detail)`` is called for each failed crop. A batch left with fewer than
    two crops joins the next one, and a lone crop at the end joins the last batch (one batch
    is held back for that): BatchNorm needs two rows, and no readable crop is left out.
    With no failures the batches pass through unchanged.

    ``merge=False`` (N ranks): one batch out per batch in, as every rank must step together;
    BatchNorm is synchronised over the ranks, so a rank may hold one crop; a rank with none
    readable stops the fit with a message (DDP needs every rank's forward).
    """
    carry, held = None, None
    for wave, rows, reasons, details in batches:
        ok = torch.tensor([not r for r in reasons], dtype=torch.bool)  # (b,)
        for k in torch.nonzero(~ok).flatten().tolist():
            skip(int(rows[k]), reasons[k], details[k])
        wave, rows = wave[ok], rows[ok]  # (b', S), (b',)
        if not merge:
            if not len(rows):
                raise FitError(f"rank {distributed.rank()}: no crop of a batch has readable audio (all "
                               f"{len(ok)} listed in skipped.tsv); remove those files and --resume")
            yield wave, rows
            continue
        if carry is not None:
            wave, rows = torch.cat([carry[0], wave]), torch.cat([carry[1], rows])
            carry = None
        if len(rows) < 2:
            carry = (wave, rows) if len(rows) else None
            continue
        if held is not None:
            yield held
        held = (wave, rows)
    if not merge:
        return
    if carry is not None and held is not None:
        held = (torch.cat([held[0], carry[0]]), torch.cat([held[1], carry[1]]))
    if held is None:
        raise FitError("fewer than 2 training utterances have readable audio; see skipped.tsv in the run directory")
    yield held
