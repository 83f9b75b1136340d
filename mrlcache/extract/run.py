"""The one pass: frozen backbone over a speaker corpus into a sharded feature cache.

Data path: manifest rows -> DataLoader workers (decode once, make every view of the
utterance) -> batches of equal-length crops (eval: a shard's whole utterances of exactly
equal length, :mod:`mrlcache.extract.buckets`) -> ``model.pooled`` under inference mode ->
one shard written atomically, in row order, when all its rows are done.

Determinism: a view is a pure function of (seed, utterance id, view index)
(:func:`mrlcache.augment.make_view`), and batches are formed inside a shard from the
shard's rows in manifest order, so a shard's vectors do not depend on which rank wrote
it, on an earlier crash, or on how many workers decoded it.

Scale-out: shard k belongs to rank ``k % world_size``; each rank holds its own lock and
writes its own shards side by side. The summary goes into ``cache.json`` once all
shards exist, by whichever rank finishes last.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

import torch

from mrlcache import engines
from mrlcache.audio import SAMPLE_RATE
from mrlcache.backbone import BackboneRecord, save_checkpoint, state_sha256
from mrlcache.backbone.record import convert_v1_meta
from mrlcache.backbone.registry import wave_minimum
from mrlcache.cache import CacheWriter, IncompleteCacheError, read_meta
from mrlcache.extract import data
from mrlcache.extract.buckets import EvalBuckets
from mrlcache.extract.config import ExtractConfig, ExtractError
from mrlcache.extract.data import ExtractProgress, UtteranceViews, collate, shard_batches, worker_init
from mrlcache.extract.sizes import check_free_disk, projected_sizes
from mrlcache.extract.sources import check_sources
from mrlcache.runtime import DeviceError, env_int, resolve_device, resolve_precision
from mrlcache.streams import StreamError, item_shape, pooled_only, record_from_json, records_from_meta, source
from mrlcache.streams.batch import forward_streams, gather, ptm_sha256, stream_info
from mrlcache.streams.windows import num_windows
from mrlcache.workers import worker_deaths

BACKBONE_FILE = "backbone.pt"  # random-init weights, saved beside the cache
LONG_SECONDS = 300  # eval mode: a whole utterance longer than this in one pass gets a warning


def cache_meta(model, cfg: ExtractConfig, precision: str, record: BackboneRecord | None, ptm=None) -> dict:
    """The settings the cached vectors depend on (a resumed run must match them).

    ``backbone`` is ``record`` with the model's SHA-256 (see :mod:`mrlcache.backbone.record`).
    A pooled-only cache has exactly the keys of caches before streams; other caches add
    ``streams`` (see docs/cache-format.md) and, with a PTM, ``ptm`` {name, source, sha256}.
    """
    train = cfg.views.mode == "train"
    meta = {
        "model_config": model.model_config if model is not None else None,
        "backbone": record.of_model(model).to_dict() if model is not None else None,
        "pooled_dim": model.pooled_dim if "pooled" in cfg.stream_names else 0,
        "sample_rate": SAMPLE_RATE,
        "mode": cfg.views.mode,
        "crop_seconds": cfg.views.crop_seconds if train else None,
        "max_seconds": None if train else cfg.views.max_seconds,
        **({} if train else {"window_seconds": cfg.views.window_seconds}),  # absent (caches before it): one pass
        "min_seconds": cfg.views.min_seconds,
        "views": cfg.views.count,
        "augment": cfg.views.augment.to_dict() if train and cfg.views.count > 1 else None,
        "seed": cfg.run.seed,
        "dtype": cfg.storage.dtype,
        "shard_size": cfg.storage.shard_size,
        "precision": precision,
    }
    if cfg.backbone.engine != "torch":  # torch caches keep exactly the keys they had before engines
        meta["engine"] = cfg.backbone.engine
    records = {name: stream_info(name, cfg, model, ptm) for name in cfg.stream_names}
    if ptm is None and {n: record_from_json(n, r) for n, r in records.items()} == records_from_meta(meta):
        return meta  # what a cache without "streams" holds (pooled alone): written as before streams
    meta["streams"] = records
    if ptm is not None:
        meta["ptm"] = {"name": ptm.name, "source": ptm.source, "sha256": ptm_sha256(ptm)}
    return meta


def check_layers_source(model, cfg: ExtractConfig, ptm=None) -> None:
    """ExtractError when a stream cannot come from the model computing it (e.g. layers whose
    block outputs differ in width), or ``--engine fused`` is asked of an encoder it is not written for."""
    for name in cfg.stream_names:
        computer = source(name, model, ptm)
        if computer is not None:
            try:
                item_shape(name, computer, cfg.storage.layers_pooled)
            except StreamError as err:
                raise ExtractError(f"--streams {cfg.storage.streams}: {err}") from None
    if model is not None and cfg.backbone.engine == "fused" and not hasattr(model, "for_inference"):
        raise ExtractError(f"--engine fused is written for ReDimNet; this backbone is "
                           f"{getattr(model, 'encoder', type(model).__name__)}: use --engine torch")


def _check_lengths(cfg: ExtractConfig, minimum: tuple[int, str]) -> None:
    """Refuse a crop or a cap shorter than the encoder takes (every view would be refused)."""
    need, who = minimum
    for option, seconds in (("--crop-seconds", cfg.views.crop_seconds if cfg.views.mode == "train" else None),
                            ("--max-seconds", cfg.views.max_seconds if cfg.views.mode == "eval" else None)):
        if seconds is not None and int(round(seconds * SAMPLE_RATE)) < need:
            raise ExtractError(f"{option} {seconds:g}: {who} needs at least {need} samples "
                               f"({need / SAMPLE_RATE:g} s); give a longer one")


def _record_of(backbone, weights_source) -> BackboneRecord:
    """The backbone record: given, or read from a format-1 style ``weights_source`` string."""
    if isinstance(backbone, BackboneRecord):
        return backbone
    if backbone is not None:
        raise ExtractError(f"backbone must be a BackboneRecord, got {type(backbone).__name__}")
    packed = convert_v1_meta({"weights_source": weights_source, "weights_sha256": None})
    return BackboneRecord.from_dict(packed["backbone"])


def extract(
    utterances,
    model,
    out,
    cfg: ExtractConfig,
    *,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    backbone: BackboneRecord | None = None,
    weights_source: str = "",
    save_backbone: bool = False,
    barrier=None,
    progress: bool = True,
    ptm=None,
) -> dict | None:
    """Run the backbone over ``utterances`` and write this rank's shards of the cache.

    Args:
        utterances: manifest in shard order (``mrlcache.corpus.Utterance`` list).
        model: a ReDimNet (``load_backbone``), any device; moved to ``cfg.run.device``; None
            when no stream needs one (a PTM's layers, handcrafted streams).
        out: cache directory.
        cfg: see :class:`ExtractConfig`.
        overwrite: start over (rank 0 only).
        rank, world_size: this process's share: shards k with k % world_size == rank.
        backbone: where the weights come from (its SHA-256 is the model's own), stored as
            the cache's ``backbone`` record.
        weights_source: instead of ``backbone``, the packed string of format 1
            ("b2-vox2-ptn", a path, "random-init:b0:seed=0"), converted to a record.
        save_backbone: random-init weights: also write them as ``out/backbone.pt``.
        barrier: callable synchronising all ranks (torchrun), used only so that rank 0 clears
            the old cache before the others open it on --overwrite.
        progress: show a rich progress bar (stderr).
        ptm: a :class:`mrlcache.streams.PTM` (``load_ptm``) computing the layers stream.
    Returns:
        The cache summary once every shard exists, else None (other ranks still running).
    """
    if not utterances:
        raise ExtractError("nothing to extract: the utterance list is empty")
    if not 0 <= rank < world_size:
        raise ExtractError(f"rank {rank} is not in [0, {world_size})")
    out = Path(out)
    try:
        local_rank = env_int("LOCAL_RANK", rank)
    except DeviceError as err:
        raise ExtractError(str(err)) from None
    try:
        device = resolve_device(cfg.run.device, local_rank)
        precision = resolve_precision(cfg.backbone.precision, device)
    except DeviceError as err:
        raise ExtractError(str(err)) from None
    if model is None and cfg.needs_redimnet:
        why = "pooled needs it" if "pooled" in cfg.stream_names else "layers needs it or --ptm"
        raise ExtractError(f"--streams {cfg.storage.streams}: give a backbone ({why})")
    check_layers_source(model, cfg, ptm)
    if (ptm is None) != (cfg.backbone.ptm is None):
        raise ExtractError("cfg.backbone.ptm names the PTM and ptm= must be that model (load_ptm), both or neither")
    save_backbone = save_backbone and model is not None
    if model is not None and model.weights_sha256 is None and save_backbone:
        model.weights_sha256 = state_sha256(model)  # what save_checkpoint below will write
    if model is not None and model.weights_sha256 is None:
        raise ExtractError("the backbone has no weights SHA-256 (random weights that were not saved)")
    record = _record_of(backbone, weights_source) if model is not None else None
    engine, why = engines.choose(cfg.backbone.engine, model, device_type=device.type,
                                 pooled_float32=pooled_only(cfg.stream_names) and precision == "fp32")
    if engine != cfg.backbone.engine:  # auto: the cache records the engine it chose
        print(f"engine auto: {engine} ({why})", file=sys.stderr)
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, engine=engine))
    meta = cache_meta(model, cfg, precision, record, ptm)
    if overwrite and world_size > 1 and barrier is None:
        raise ExtractError("--overwrite with several ranks needs torchrun; without it, delete the cache "
                           "(or run once with --overwrite and --world-size 1) and start the ranks again")
    # Before any file is touched: a bad --noise-dir/--rir-dir fails here, not mid-run.
    minimum = wave_minimum(model)
    _check_lengths(cfg, minimum)
    dataset = UtteranceViews(utterances, cfg, minimum)
    if rank == 0:  # the cache must fit the disk (less what an earlier run wrote)
        present = sum(p.stat().st_size for p in (out / "shards").rglob("*") if p.is_file()) if not overwrite and \
            (out / "shards").is_dir() else 0
        check_free_disk(out, projected_sizes(utterances, cfg, model, ptm), cfg, present)

    if overwrite and world_size > 1 and rank != 0:
        barrier()  # rank 0 clears the old cache first
    writer = CacheWriter(out, meta, utterances, backend=cfg.storage.format, overwrite=overwrite and rank == 0,
                         rank=rank)
    try:
        if overwrite and world_size > 1 and rank == 0:
            barrier()
        if save_backbone:
            # Every rank writes the same bytes, atomically, so concurrent ranks cannot mix them.
            sha = save_checkpoint(model, out / BACKBONE_FILE)
            assert sha == meta["backbone"]["sha256"], "random backbone bytes changed between hashing and saving"
        check_sources(out, utterances)  # a rerun never keeps vectors of audio replaced since
        mine = [k for k in range(writer.num_shards) if k % world_size == rank]
        todo = sorted(set(mine) - writer.done_shards())
        if not todo:
            previous = read_meta(out).get("summary")
            if previous:
                return previous  # nothing to do: keep the numbers of the run that did the work
        if cfg.backbone.engine == "onnxruntime" and device.type != "cpu":
            raise ExtractError("--engine onnxruntime runs on the CPU: use --device cpu, or the torch engine")
        stats = _run(writer, dataset, (model, ptm), cfg, device, precision, todo, rank, progress)
        # No barrier here: ranks may finish hours apart, so whichever completes the set
        # of shards writes the summary (computed from the shards, the same for any rank).
        try:
            summary = writer.finish(stats)
        except IncompleteCacheError:
            return None  # other ranks are still writing; the last one writes the summary
    finally:
        writer.close()
    return summary


def _run(writer, dataset, models, cfg, device, precision, todo, rank, progress) -> dict:
    """Decode, forward and write the shards ``todo``; returns this rank's timing numbers."""
    model, ptm = (m.to(device).eval() if m is not None else None for m in models)
    names = cfg.stream_names
    infos = {name: record.to_json() for name, record in writer.records.items()}
    stream_seconds = dict.fromkeys(names, 0.0)
    batch_size = cfg.run.batch_size or (8 if device.type == "cpu" else 128)
    utts_per_batch = 1 if cfg.views.mode == "eval" else max(1, batch_size // cfg.views.count)
    batches = [b for k in todo for b in shard_batches(writer.shard_rows(k), utts_per_batch)]
    workers = cfg.run.workers if cfg.run.workers is not None else default_workers(device)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        # On the CPU the workers share the cores with the model's threads: they yield to them.
        worker_init_fn=functools.partial(worker_init, parent=os.getpid(),
                                         nice=data.WORKER_NICE if device.type == "cpu" else 0) if workers else None,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    # Workers start decoding now, while the engine is made (the folded copy, or the cached
    # onnxruntime file read and checked): the first batches are ready when it is.
    batches_in = iter(loader)
    model = _engine_model(model, cfg, workers)
    total_rows = sum(len(writer.shard_rows(k)) for k in todo)
    shard_of = {row: k for k in todo for row in writer.shard_rows(k)}
    pending = {}  # shard -> {"index": [], <stream>: [batches], "skipped": {}, "seconds": float, "left": int}
    done_rows, audio_seconds, model_seconds = 0, 0.0, 0.0
    started = time.perf_counter()
    bar = ExtractProgress(total_rows, rank, enabled=progress)
    # Eval: a shard's utterances of equal length run together (buckets.py); train: as decoded.
    buckets = EvalBuckets(batch_size if cfg.run.eval_batch == "bucket" else 1, cfg.views.window_seconds) \
        if cfg.views.mode == "eval" else None
    hint = ("the shards written so far are kept: rerun the same command to resume, with fewer --workers if memory "
            "is short")
    with bar, torch.inference_mode(), worker_deaths(ExtractError, hint):  # a worker may die during a forward
        for items in batches_in:
            k = shard_of[items[0].row]
            state = pending.setdefault(k, {"index": [], "skipped": {}, "windowed": {}, "seconds": 0.0,
                                           "left": len(writer.shard_rows(k))})
            ok = [it for it in items if it.views is not None]
            for it in items:
                if it.views is None:
                    state["skipped"][it.utt_id] = it.reason
                elif cfg.views.mode == "eval":
                    _note_long(it, cfg, state["windowed"], bar)
            state["seconds"] += sum(it.seconds for it in items)
            state["left"] -= len(items)
            skipped = [it for it in items if it.views is None]
            bar.update(len(skipped), 0.0)
            groups = (buckets.add(k, ok) if buckets else [ok] if ok else []) + \
                (buckets.finish(k) if buckets and state["left"] == 0 else [])
            for group in groups:
                tick = time.perf_counter()
                for name, value in forward_streams(model, ptm, group, device, precision, cfg, stream_seconds).items():
                    state.setdefault(name, []).append(value)
                model_seconds += time.perf_counter() - tick
                state["index"].extend(it.row for it in group)
                seconds = sum(it.seconds for it in group)
                audio_seconds += seconds
                bar.update(len(group), seconds)
            done_rows += len(items)
            if state["left"] == 0:
                index, values = _in_row_order(state["index"], gather(state, infos, cfg.views.count))
                writer.write_shard(k, index, None, state["skipped"], state["seconds"], values,
                                   windowed=state["windowed"])
                del pending[k]
    elapsed = time.perf_counter() - started
    return {
        "elapsed_seconds": elapsed,
        "utterances_per_second": done_rows / elapsed if elapsed > 0 else 0.0,
        "audio_seconds_per_second": audio_seconds / elapsed if elapsed > 0 else 0.0,
        "model_busy_fraction": model_seconds / elapsed if elapsed > 0 else 0.0,
        "device": str(device),
        "engine": cfg.backbone.engine,
        **({"stream_seconds": stream_seconds} if "streams" in writer.meta else {}),
    }


def _in_row_order(index: list[int], values: dict) -> tuple[list[int], dict]:
    """A shard's rows and stream values (dense (n, ...) arrays or lists) sorted by row: eval's
    buckets run out of order, the cache keeps its order (the same bytes as one per forward)."""
    order = sorted(range(len(index)), key=index.__getitem__)
    if order == list(range(len(index))):
        return index, values
    return [index[i] for i in order], {name: [v[i] for i in order] if isinstance(v, list) else v[order]
                                       for name, v in values.items()}


def default_workers(device) -> int:
    """Decoding workers when ``--workers`` is not given: up to 8 beside a GPU (a core left for
    the main process); on the CPU 1 when a core is left beside the model's threads, else 0.

    On cores the model's threads all use, a worker has no core of its own: each time it runs it
    preempts a model thread and the other waits at OpenMP's barrier, so decoding in the main
    process between forwards costs less. b2 on 2 cores with 2 threads (benchmarks/README.md,
    session 9, quiet): extract at 0.99 of the bare forward with no worker against 0.90 with one
    (torch engine), 0.88 against 0.83 (fused), 0.98 against 1.06 (onnxruntime).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    if device.type != "cpu":
        return min(8, max(1, cores - 1))
    return 1 if torch.get_num_threads() < cores else 0


def _engine_model(model, cfg: ExtractConfig, workers: int):
    """The backbone as ``cfg.backbone.engine`` runs it (:func:`mrlcache.engines.engine_backbone`).

    onnxruntime's idle threads sleep when decoding workers share the cores (spinning cost
    1.13-1.31x there); its file is exported once and kept on disk, the saved backbone stays torch's.
    """
    if model is None or cfg.backbone.engine == "torch":
        return model
    from mrlcache.export import ExportError

    try:
        return engines.engine_backbone(cfg.backbone.engine, model, spin=workers == 0, log=lambda m: print(m, file=sys.stderr))
    except ExportError as err:
        raise ExtractError(str(err)) from None


def _note_long(item, cfg: ExtractConfig, windowed: dict, bar) -> None:
    """Record and say how a long eval utterance is computed: in windows, or in one pass."""
    samples = item.views.shape[-1]
    count = num_windows(samples, cfg.views.window_seconds) if cfg.needs_redimnet else 1
    if count > 1:
        windowed[item.utt_id] = count
        ptm = f"; the --ptm {cfg.backbone.ptm} layers take one pass" if cfg.backbone.ptm else ""
        bar.note(f"note: {item.utt_id}: {samples / SAMPLE_RATE / 60:.1f} minutes in {count} windows of at most "
                 f"{cfg.views.window_seconds:g} s, pooled statistics combined (--window-seconds; docs/design.md){ptm}")
    elif samples > LONG_SECONDS * SAMPLE_RATE:
        if not cfg.needs_redimnet:
            why = f"--streams {cfg.storage.streams} take one pass"
        else:
            why = f"--window-seconds {'none' if cfg.views.window_seconds is None else f'{cfg.views.window_seconds:g}'}"
        bar.note(f"warning: {item.utt_id}: {samples / SAMPLE_RATE / 60:.1f} minutes in one forward pass ({why}; "
                 f"memory grows with length, about 5 MB per second of audio for b0); cap such files with "
                 f"--max-seconds or a smaller --window-seconds")
