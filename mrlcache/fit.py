"""Fit the Matryoshka head on cached pooled vectors (and, end to end, on audio).

The cache holds ``V`` views (clean crop + augmented crops) of every training utterance as
pooled backbone vectors. Each epoch every training utterance contributes one of its views,
drawn at random, so augmentation costs nothing at fit time. The features live in memory
(float16 or float32) when they fit ``memory_gb``; otherwise they are streamed shard by
shard, each shard read whole for the views it needs and shuffled within a window of shards.

Model selection is by EER, never by training loss: after every ``val_every`` epochs the
head is scored on verification trials at every dim (an external validation cache and
trial list, or trials built from held-out training speakers), and the checkpoint with the
lowest mean EER over dims is kept; ``patience`` stops a fit that no longer improves.

Determinism: the head is initialised after ``torch.manual_seed(seed)`` and every random
draw of epoch ``e`` (views, order; the classes of ``class_sample`` from a second stream)
comes from a generator seeded by ``(seed, e)``, so a
fit resumed from ``last.pt`` replays the same epochs as an uninterrupted one (bit-identical
on the CPU with the same number of threads).

Run directory: ``config.yaml``, ``fingerprint.json``, ``history.jsonl``, TensorBoard
events, ``last.pt`` (resumable), ``best.pt``, ``model.pt`` (see :mod:`mrlcache.model`),
``summary.json``; end to end also ``skipped.tsv`` (utt_id, reason, detail of every audio
file that gave no usable wave: such files are left out, never fatal).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import yaml

from mrlcache.head import MatryoshkaHead, MatryoshkaMarginLoss, check_dims, sample_classes
from mrlcache.runtime import atomic_torch_save as atomic_save


class FitError(ValueError):
    """Options or inputs a fit cannot run with; the message names the fix."""


@dataclass
class FitConfig:
    """Every option of a fit; names match the ``mrlcache fit`` options."""

    dims: tuple[int, ...] = (64, 128, 192, 256)
    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 2e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-2
    scheduler: str = "cosine"  # cosine (per step, linear warm-up) | plateau (on val mean EER)
    warmup_epochs: float = 1.0
    grad_clip: float = 5.0  # max gradient norm; 0 disables
    loss: str = "aam"  # aam | softmax
    margin: float = 0.2
    scale: float = 32.0
    margin_warmup_epochs: int = 5  # margin grows linearly from 0 over these epochs
    subcenters: int = 1
    classifier: str = "shared"  # shared | per-dim
    class_sample: float = 1.0  # share of classes in each step's softmax (Partial FC); 1: all
    dim_weights: tuple[float, ...] | None = None
    val_cache: str | None = None
    val_trials: str | None = None
    val_speakers: int | None = None  # None: automatic (5% of speakers, 2..200); 0: no validation
    val_every: int = 1
    max_val_trials: int = 50000
    patience: int = 0  # epochs without a better mean EER before stopping; 0: never stop
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (CPU autocast: bf16 matmuls, fp32 softmax); CUDA: fp16 AMP
    feature_dtype: str = "float16"  # in-memory feature dtype
    memory_gb: float | None = None  # None: half the available memory
    embed_backbone: bool = True
    weights: str | None = None  # backbone file for model.pt, when the cache does not carry it
    head_only: bool = False  # model.pt without a backbone (vectors from no known backbone)
    progress: bool = True
    # end-to-end mode only
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise FitError for an option value no fit can use."""
        try:
            self.dims = check_dims(self.dims)
        except ValueError as err:
            raise FitError(str(err)) from None
        choices = {"optimizer": ("adamw", "sgd"), "scheduler": ("cosine", "plateau"),
                   "loss": ("aam", "softmax"), "classifier": ("shared", "per-dim"),
                   "device": ("auto", "cpu", "cuda"), "precision": ("fp32", "bf16"),
                   "feature_dtype": ("float16", "float32")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise FitError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "val_every", "subcenters"):
            if int(getattr(self, name)) < 1:
                raise FitError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 < float(self.class_sample) <= 1:
            raise FitError(f"class_sample={self.class_sample}: give a share of the classes in (0, 1], e.g. 0.5")
        if self.batch_size < 2:
            raise FitError("batch_size must be >= 2 (BatchNorm needs two rows)")
        if self.dim_weights is not None and len(self.dim_weights) != len(self.dims):
            raise FitError(f"dim_weights {list(self.dim_weights)}: give one weight per dim in {list(self.dims)}")
        if (self.val_cache is None) != (self.val_trials is None):
            raise FitError("validation needs both --val-cache DIR and --val-trials FILE (or neither)")
        if self.scheduler == "plateau" and self.val_speakers == 0 and self.val_cache is None:
            raise FitError("scheduler=plateau steps on the validation EER: do not disable validation")


# ----------------------------------------------------------------------------- data


def _epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    # One generator per epoch (and per use: 0 data, 1 class sampling), so a resumed fit
    # draws exactly what an uninterrupted one does.
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + int(stream) * 2**40)


def _batch_slices(n: int, batch_size: int) -> list[slice]:
    """Batches covering 0..n; a last batch of one row joins the previous one (BatchNorm)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


def _gather(src: np.ndarray, idx: np.ndarray, gathered: np.ndarray, x: torch.Tensor, device) -> torch.Tensor:
    """Rows ``src[idx]`` as float32 on ``device``, through the reused buffers ``gathered``
    (src's dtype) and ``x`` (float32): gathers and conversion into preallocated buffers are
    ~10x faster than fresh allocations here. On the CPU the result is a view of ``x``."""
    n = len(idx)
    np.take(src, idx, axis=0, out=gathered[:n])
    x[:n].copy_(torch.from_numpy(gathered[:n]))
    return x[:n].to(device, non_blocking=True)


class MemoryFeatures:
    """All views of all utterances in memory; each epoch gathers one view per row."""

    def __init__(self, pooled: np.ndarray, labels: np.ndarray, train_rows: np.ndarray):
        self.pooled = pooled  # (N, V, D) float16 or float32
        self.labels = torch.from_numpy(labels.astype(np.int64))  # (N,), -1 for held out
        self.train_rows = train_rows
        n, self.num_views, self.dim = pooled.shape
        self._flat = pooled.reshape(n * self.num_views, self.dim)  # a view, no copy

    def epoch(self, seed: int, epoch: int, batch_size: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x (b, D) float32 on device, labels (b,)) covering every training row once.

        On the CPU ``x`` is a view of one reused buffer: consume it before the next batch.
        """
        g = _epoch_generator(seed, epoch)
        views = torch.randint(self.num_views, (len(self.labels),), generator=g).numpy()
        order = self.train_rows[torch.randperm(len(self.train_rows), generator=g).numpy()]
        slices = _batch_slices(len(order), batch_size)
        cap = max(s.stop - s.start for s in slices)
        gathered = np.empty((cap, self.dim), dtype=self.pooled.dtype)
        x = torch.empty((cap, self.dim), dtype=torch.float32)
        for sl in slices:
            rows = order[sl]
            yield _gather(self._flat, rows * self.num_views + views[rows], gathered, x, device), \
                self.labels[rows].to(device)


class StreamedFeatures:
    """Features read shard by shard each epoch: only the sampled views, shuffled in windows."""

    def __init__(self, shards: list, labels: np.ndarray, train_mask: np.ndarray, num_views: int,
                 dim: int, window_rows: int, dtype):
        self.shards = shards
        self.sizes = np.array([len(s.utterances) for s in shards])
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.labels, self.train_mask = labels.astype(np.int64), train_mask
        self.num_views, self.dim, self.dtype = num_views, dim, dtype
        self.window = max(1, int(window_rows // max(1, self.sizes.max())))  # shards per window

    def epoch(self, seed, epoch, batch_size, device):
        """Yield (x (b, D) float32 on device, labels (b,)) covering every training row once.

        Rows stay in the stored dtype until a batch is gathered and converted into one reused
        float32 buffer (on the CPU ``x`` is a view of it: consume it before the next batch).
        """
        g = _epoch_generator(seed, epoch)
        views = torch.randint(self.num_views, (int(self.offsets[-1]),), generator=g).numpy()
        shard_order = torch.randperm(len(self.shards), generator=g).numpy()
        cap = batch_size + 1  # _batch_slices may give the last batch one more row
        gathered = np.empty((cap, self.dim), dtype=self.dtype)
        x = torch.empty((cap, self.dim), dtype=torch.float32)
        carry_x = np.empty((0, self.dim), self.dtype)
        carry_y = np.empty((0,), np.int64)
        for w in range(0, len(shard_order), self.window):
            xs, ys = [carry_x], [carry_y]
            for k in shard_order[w:w + self.window]:
                a, b = self.offsets[k], self.offsets[k + 1]
                keep = np.flatnonzero(self.train_mask[a:b])
                v = views[a:b][keep]
                block = np.empty((len(keep), self.dim), self.dtype)
                for view in np.unique(v):  # read each needed view of the shard once
                    sel = np.flatnonzero(v == view)
                    block[sel] = self.shards[k].read("pooled", view=int(view), dtype=self.dtype)[keep[sel]]
                xs.append(block)
                ys.append(self.labels[a:b][keep])
            xw, yw = np.concatenate(xs), np.concatenate(ys)
            perm = torch.randperm(len(yw), generator=g).numpy()
            last = w + self.window >= len(shard_order)
            n_full = len(yw) if last else (len(yw) // batch_size) * batch_size
            for sl in _batch_slices(n_full, batch_size):
                rows = perm[sl]
                yield _gather(xw, rows, gathered, x, device), torch.from_numpy(yw[rows]).to(device)
            carry_x, carry_y = xw[perm[n_full:]], yw[perm[n_full:]]


def _available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 4.0


# ----------------------------------------------------------------------------- validation


@dataclass
class ValSet:
    """Pooled vectors (N, D) float32 and trials as index pairs with 0/1 labels."""

    pooled: np.ndarray
    enroll: np.ndarray
    test: np.ndarray
    labels: np.ndarray
    source: str
    batch: int = 1024  # rows per embedding pass (small for waveforms)


def heldout_trials(speakers: np.ndarray, max_trials: int, seed: int):
    """All pairs among held-out utterances, or a seeded sample of ``max_trials`` distinct pairs.

    Returns (enroll (T,), test (T,), labels (T,) int8).
    """
    n = len(speakers)
    if n * (n - 1) // 2 <= max_trials:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=max_trials * 2)
        j = rng.integers(0, n, size=max_trials * 2)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        pairs = np.unique(lo[lo != hi] * n + hi[lo != hi])[:max_trials]
        i, j = pairs // n, pairs % n
    labels = (speakers[i] == speakers[j]).astype(np.int8)
    return i, j, labels


def external_valset(val_cache, trials_path) -> ValSet:
    """Validation vectors (view 0) from a cache and a trial list naming its utterances."""
    from mrlcache import cache as cache_mod
    from mrlcache.trials import read_trials

    vc = cache_mod.open(val_cache) if isinstance(val_cache, (str, os.PathLike)) else val_cache
    trials = read_trials(trials_path)
    index = {u: k for k, u in enumerate(vc.utterances)}
    missing = sorted({u for u in (*trials.enroll, *trials.test) if u not in index})
    if missing:
        why = vc.skipped.get(missing[0], "not in the cache")
        raise FitError(
            f"{trials_path}: {len(missing)} trial utterance(s) have no vector in {val_cache}, "
            f"e.g. {missing[0]} ({why}); extract them or remove those trials"
        )
    enroll = np.array([index[u] for u in trials.enroll])
    test = np.array([index[u] for u in trials.test])
    return ValSet(vc.read("pooled", view=0, dtype=np.float32), enroll, test,
                  np.asarray(trials.labels, np.int8), f"{trials_path}")


def raw_eer(val: ValSet) -> float:
    """EER of cosine scoring on the raw pooled vectors: the baseline a head must beat."""
    from mrlcache.metrics import eer
    from mrlcache.scoring import score_trials

    return eer(score_trials(val.pooled, val.enroll, val.test, [val.pooled.shape[1]])[0], val.labels)[0]


@torch.no_grad()
def evaluate(embed_fn, val: ValSet, dims, device) -> dict:
    """EER and minDCF at every dim. ``embed_fn``: (b, D) pooled on device -> (b, max_dim)."""
    from mrlcache.metrics import eer, min_dcf
    from mrlcache.scoring import score_trials

    embs = []
    for sl in _batch_slices(len(val.pooled), val.batch):
        embs.append(embed_fn(torch.from_numpy(val.pooled[sl]).to(device)).float().cpu())
    # The scoring `mrlcache eer` uses: all prefixes in one pass (float32 products, float64 sums).
    scores = score_trials(torch.cat(embs).numpy(), val.enroll, val.test, list(dims))  # (S, T)
    out = {"eer": {}, "min_dcf": {}}
    for d, s in zip(dims, scores):
        out["eer"][d] = eer(s, val.labels)[0]
        out["min_dcf"][d] = min_dcf(s, val.labels)
    out["mean_eer"] = float(np.mean(list(out["eer"].values())))
    return out


# ----------------------------------------------------------------------------- run files


def meta_hash(meta: dict) -> str:
    """SHA-256 of the cache metadata as canonical JSON."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def _config_dict(cfg: FitConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["dims"] = list(cfg.dims)
    d["dim_weights"] = None if cfg.dim_weights is None else list(cfg.dim_weights)
    return d


def _resolve_device(name: str) -> torch.device:
    """The extractor's rule ("auto": this process's GPU if any, else the CPU), fit's error type."""
    from mrlcache.runtime import DeviceError as ExtractError
    from mrlcache.runtime import resolve_device

    try:
        return resolve_device(name, int(os.environ.get("LOCAL_RANK", 0)))
    except ExtractError as err:
        raise FitError(str(err)) from None


def _make_optimizer(cfg: FitConfig, groups):
    # Fused kernels: one pass per parameter instead of ~8 elementwise ops (AdamW step +
    # clipping measured ~12 -> ~4 ms per step at the b2/5994-class geometry on 2 cores).
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=True, fused=True)


def _param_groups(modules, cfg: FitConfig, lr=None):
    # No weight decay on BatchNorm parameters and biases: decay there only shrinks the scale.
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            (no_decay if p.ndim < 2 else decay).append(p)
    lr = cfg.lr if lr is None else lr
    return [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


def _make_scheduler(cfg: FitConfig, opt, steps_per_epoch: int):
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2)
    warm = max(1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    total = max(warm + 1, cfg.epochs * steps_per_epoch)

    def factor(step):  # linear warm-up, then cosine to zero over the remaining steps
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Job:
    """What the shared training loop needs from a mode (cache or end to end)."""

    cfg: FitConfig
    out: Path
    head: MatryoshkaHead
    loss_fn: MatryoshkaMarginLoss
    batches: object  # callable(epoch) -> iterator of (input, labels)
    embed: object  # callable(input) -> (b, max_dim), training forward
    val_embed: object  # callable(pooled (b, D)) -> (b, max_dim) in eval mode
    val: ValSet | None
    num_train: int
    steps_per_epoch: int
    device: torch.device
    optimizer: object
    scheduler: object
    extra_modules: dict = field(default_factory=dict)  # e.g. {"backbone": module} to checkpoint
    on_epoch_start: object = None  # callable(epoch) for e.g. unfreezing
    grad_accum: int = 1


def _train(job: _Job, resume: bool) -> dict:
    cfg, out = job.cfg, job.out
    from torch.utils.tensorboard import SummaryWriter

    use_amp = job.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    autocast_dtype = torch.float16 if use_amp else (torch.bfloat16 if cfg.precision == "bf16" else None)

    start, best, history = 0, {"epoch": None, "mean_eer": None}, []
    last_path, hist_path = out / "last.pt", out / "history.jsonl"
    if resume:
        state = torch.load(last_path, map_location=job.device, weights_only=False)
        job.head.load_state_dict(state["head"])
        job.loss_fn.load_state_dict(state["loss"])
        for name, mod in job.extra_modules.items():
            mod.load_state_dict(state["extra"][name])
        if job.on_epoch_start:
            job.on_epoch_start(state["epoch"])  # restore e.g. the unfrozen param group first
        job.optimizer.load_state_dict(state["optimizer"])
        job.scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start, best = state["epoch"], state["best"]
        # Keep only the epochs the checkpoint has seen (a crash may leave one more line).
        lines = hist_path.read_text().splitlines() if hist_path.exists() else []
        history = [json.loads(x) for x in lines if x.strip()]
        history = [h for h in history if h["epoch"] < start]
        hist_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    writer = SummaryWriter(str(out / "tensorboard"), purge_step=start if resume else None)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True, quiet=not cfg.progress)
    dims = job.loss_fn.dims
    stopped_early = False
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        if job.on_epoch_start:
            job.on_epoch_start(epoch)
        warm = cfg.margin_warmup_epochs
        job.loss_fn.set_margin(cfg.margin * (min(1.0, epoch / warm) if warm > 0 else 1.0))
        job.head.train()
        job.loss_fn.train()
        sums = torch.zeros(2, len(dims), dtype=torch.float64)  # loss, accuracy per dim, x rows
        class_gen = _epoch_generator(cfg.seed, epoch, stream=1) if cfg.class_sample < 1 else None
        seen = 0
        with Progress(TextColumn(f"epoch {epoch + 1}/{cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, transient=True,
                      disable=not cfg.progress) as bar:
            task = bar.add_task("fit", total=job.steps_per_epoch)
            pending = False  # gradients accumulated since the last optimiser step
            for step, (x, y) in enumerate(job.batches(epoch)):
                with torch.autocast(job.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    emb = job.embed(x)
                    classes = None
                    if class_gen is not None:
                        classes = sample_classes(y, job.loss_fn.num_classes, cfg.class_sample, class_gen).to(y.device)
                    loss, dim_loss, dim_acc = job.loss_fn(emb, y, classes)
                # Gradient accumulation: average over grad_accum batches, then one step.
                scaler.scale(loss / job.grad_accum).backward()
                pending = True
                if (step + 1) % job.grad_accum == 0 or step + 1 == job.steps_per_epoch:
                    _optimizer_step(job, scaler)
                    pending = False
                n = len(y)
                sums[0] += dim_loss.detach().double().cpu() * n
                sums[1] += dim_acc.double().cpu() * n
                seen += n
                bar.advance(task)
            if pending:
                # Fewer batches than planned (end to end: unreadable files dropped): the
                # epoch's last accumulated gradients still make a step.
                _optimizer_step(job, scaler)
        train_loss = (sums[0] / max(seen, 1)).tolist()
        train_acc = (sums[1] / max(seen, 1)).tolist()
        rec = {"epoch": epoch, "margin": job.loss_fn.margin, "lr": job.optimizer.param_groups[0]["lr"],
               "samples": seen, "loss": dict(zip(map(str, dims), train_loss)),
               "accuracy": dict(zip(map(str, dims), train_acc))}
        validate = job.val is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
        if validate:
            job.head.eval()
            v = evaluate(job.val_embed, job.val, dims, job.device)
            rec["val_eer"] = {str(d): e for d, e in v["eer"].items()}
            rec["val_min_dcf"] = {str(d): e for d, e in v["min_dcf"].items()}
            rec["val_mean_eer"] = v["mean_eer"]
            if cfg.scheduler == "plateau":
                job.scheduler.step(v["mean_eer"])
            if best["mean_eer"] is None or v["mean_eer"] < best["mean_eer"]:
                best = {"epoch": epoch, "mean_eer": v["mean_eer"], "eer": rec["val_eer"],
                        "min_dcf": rec["val_min_dcf"]}
                atomic_save({"epoch": epoch, "head": job.head.state_dict(), "loss": job.loss_fn.state_dict(),
                              "extra": {k: m.state_dict() for k, m in job.extra_modules.items()},
                              "val": best}, out / "best.pt")
        elif job.val is None:
            # No validation: the last epoch is the model (recorded as such in summary.json).
            best = {"epoch": epoch, "mean_eer": None}
            atomic_save({"epoch": epoch, "head": job.head.state_dict(), "loss": job.loss_fn.state_dict(),
                          "extra": {k: m.state_dict() for k, m in job.extra_modules.items()},
                          "val": None}, out / "best.pt")
        rec["seconds"] = time.perf_counter() - t0
        rec["samples_per_s"] = seen / rec["seconds"]
        with open(hist_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        history.append(rec)
        _log_tensorboard(writer, rec, dims)
        atomic_save({"epoch": epoch + 1, "head": job.head.state_dict(), "loss": job.loss_fn.state_dict(),
                      "extra": {k: m.state_dict() for k, m in job.extra_modules.items()},
                      "optimizer": job.optimizer.state_dict(), "scheduler": job.scheduler.state_dict(),
                      "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(), "best": best,
                      "config": _config_dict(cfg)}, last_path)
        line = f"epoch {epoch + 1}/{cfg.epochs} loss {sum(train_loss) / len(dims):.3f} " \
               f"acc {train_acc[-1]:.3f} lr {rec['lr']:.2e} {rec['seconds']:.1f}s"
        if validate:
            line += " EER% " + " ".join(f"{d}:{100 * v['eer'][d]:.2f}" for d in dims)
        console.print(line)
        if (cfg.patience > 0 and best["epoch"] is not None and job.val is not None
                and epoch - best["epoch"] >= cfg.patience):
            stopped_early = True
            console.print(f"early stop: no better mean EER for {cfg.patience} epochs")
            break
    writer.close()
    return {"best": best, "history": history, "stopped_early": stopped_early}


def _optimizer_step(job: _Job, scaler) -> None:
    """Clip, step, zero the gradients, and advance a per-step (cosine) schedule."""
    if job.cfg.grad_clip > 0:
        scaler.unscale_(job.optimizer)
        params = [p for g in job.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, job.cfg.grad_clip)
    scaler.step(job.optimizer)
    scaler.update()
    job.optimizer.zero_grad(set_to_none=True)
    if job.cfg.scheduler == "cosine":
        job.scheduler.step()


def _log_tensorboard(writer, rec: dict, dims) -> None:
    step = rec["epoch"]
    for d in dims:
        writer.add_scalar(f"loss/{d}", rec["loss"][str(d)], step)
        writer.add_scalar(f"accuracy/{d}", rec["accuracy"][str(d)], step)
        if "val_eer" in rec:
            writer.add_scalar(f"val_eer/{d}", rec["val_eer"][str(d)], step)
            writer.add_scalar(f"val_min_dcf/{d}", rec["val_min_dcf"][str(d)], step)
    writer.add_scalar("lr", rec["lr"], step)
    writer.add_scalar("margin", rec["margin"], step)
    writer.add_scalar("seconds", rec["seconds"], step)
    if "val_mean_eer" in rec:
        writer.add_scalar("val_eer/mean", rec["val_mean_eer"], step)


def _prepare_out(out: Path, cfg: FitConfig, resume: bool, fingerprint: dict) -> bool:
    """Create or check the run directory; returns whether to resume from last.pt."""
    if resume:
        if not (out / "last.pt").exists():
            raise FitError(f"--resume: {out}/last.pt does not exist; start the fit without --resume")
        old = json.loads((out / "fingerprint.json").read_text())
        if old.get("cache_meta_sha256") != fingerprint["cache_meta_sha256"]:
            raise FitError(f"--resume: {out} was fitted on another cache (metadata hash differs)")
        old_cfg = yaml.safe_load((out / "config.yaml").read_text())
        # Options that change what an epoch computes must match; epochs/patience may grow.
        free = {"epochs", "patience", "progress", "device", "val_every"}
        changed = sorted(k for k, v in _config_dict(cfg).items() if k not in free and old_cfg.get(k) != v)
        if changed:
            raise FitError(f"--resume: options differ from {out}/config.yaml: {', '.join(changed)}")
        return True
    if (out / "last.pt").exists():
        raise FitError(f"{out} already holds a fit; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return False


def _write_run_header(out: Path, cfg: FitConfig, fingerprint: dict) -> None:
    (out / "config.yaml").write_text("# mrlcache fit: resolved options\n" + yaml.safe_dump(_config_dict(cfg), sort_keys=True))
    (out / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def _finish(job: _Job, result: dict, backbone, backbone_ref, extra_summary: dict) -> None:
    """Write model.pt from best.pt, summary.json, and print the final table."""
    from mrlcache.model import save_model

    cfg, out = job.cfg, job.out
    best_state = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    head = MatryoshkaHead(job.head.pooled_dim, job.head.dims)
    head.load_state_dict(best_state["head"])
    if "backbone" in best_state.get("extra", {}) and backbone is not None:
        backbone.load_state_dict(best_state["extra"]["backbone"])
    save_model(out / "model.pt", head, backbone=backbone, embed_backbone=cfg.embed_backbone,
               backbone_ref=backbone_ref)
    summary = {"best_epoch": result["best"]["epoch"], "best": result["best"],
               "epochs_run": len(result["history"]), "stopped_early": result["stopped_early"],
               "selected_by": "val mean EER" if job.val is not None else "last epoch (no validation)",
               **extra_summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.progress and job.val is not None and result["best"]["mean_eer"] is not None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{out.name}: best epoch {result['best']['epoch'] + 1}")
        table.add_column("dim", justify="right")
        table.add_column("EER %", justify="right")
        table.add_column("minDCF", justify="right")
        for d in job.head.dims:
            table.add_row(str(d), f"{100 * result['best']['eer'][str(d)]:.2f}",
                          f"{result['best']['min_dcf'][str(d)]:.3f}")
        if "raw_eer" in extra_summary:
            table.add_row(f"raw {job.head.pooled_dim}", f"{100 * extra_summary['raw_eer']:.2f}", "")
        Console(stderr=True).print(table)


# ----------------------------------------------------------------------------- cache mode


def fit(cache, dims: Sequence[int], out, *, backbone=None, resume: bool = False, **options) -> Path:
    """Fit a Matryoshka head on a feature cache; returns the run directory.

    Args:
        cache: cache directory (opened with ``mrlcache.cache.open``) or an opened Cache.
        dims: nested embedding sizes, e.g. (64, 128, 192, 256).
        out: run directory (created; an existing fit there needs ``resume=True``).
        backbone: the backbone the cache came from, for model.pt; default: resolved from the
            cache (``weights`` option, ``DIR/backbone.pt``, or the cache's ``weights_source``)
            and checked against the cache's ``weights_sha256``.
        resume: continue the fit in ``out`` from ``last.pt``.
        options: any field of :class:`FitConfig`.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(FitConfig)})
    if unknown:
        raise FitError(f"unknown fit option(s): {', '.join(unknown)}")
    cfg = FitConfig(dims=tuple(dims), **options)
    cfg.check()
    out = Path(out)
    cache_dir = None
    if isinstance(cache, (str, os.PathLike)):
        from mrlcache import cache as cache_mod

        cache_dir = Path(cache)
        if not cache_dir.exists():
            raise FitError(f"--cache {cache_dir}: no such directory; run 'mrlcache extract' first")
        cache = cache_mod.open(cache_dir)
    else:
        cache_dir = Path(cache.path) if getattr(cache, "path", None) else None
    meta = dict(cache.meta)
    pooled_dim = int(cache.dim)
    if cfg.dims[-1] > pooled_dim:
        raise FitError(f"dims {list(cfg.dims)}: largest dim exceeds the cached pooled size {pooled_dim}")
    device = _resolve_device(cfg.device)

    backbone_ref = None
    if not cfg.head_only and backbone is None:
        from mrlcache.backbone import backbone_for_cache

        backbone, backbone_ref = backbone_for_cache(cache_dir, meta, weights=cfg.weights)
    if cfg.head_only:
        backbone = None

    fingerprint = {"cache": str(cache_dir) if cache_dir else None, "cache_meta_sha256": meta_hash(meta),
                   "weights_sha256": meta.get("weights_sha256"), "model_config": meta.get("model_config"),
                   "utterances": len(cache.utterances), "views": int(cache.num_views),
                   "pooled_dim": pooled_dim}

    # Speakers: held-out ones (no external validation) give the validation trials.
    speakers = np.asarray(cache.speakers)
    names = sorted(set(speakers.tolist()))
    val_names: list[str] = []
    if cfg.val_cache is None:
        n_val = cfg.val_speakers
        if n_val is None:
            n_val = min(200, max(2, len(names) // 20)) if len(names) >= 6 else 0
        if n_val and n_val > len(names) - 2:
            raise FitError(f"--val-speakers {n_val}: the cache has only {len(names)} speakers; "
                           f"keep at least 2 for training")
        cfg.val_speakers = int(n_val)
        pick = np.random.default_rng(cfg.seed).permutation(len(names))[:n_val]
        val_names = sorted(names[k] for k in pick)
    train_names = [s for s in names if s not in set(val_names)]
    resume = _prepare_out(out, cfg, resume, fingerprint)
    cls = {s: k for k, s in enumerate(train_names)}
    labels = np.array([cls.get(s, -1) for s in speakers], np.int64)
    train_rows = np.flatnonzero(labels >= 0)

    need_gb = len(speakers) * cache.num_views * pooled_dim * np.dtype(cfg.feature_dtype).itemsize / 2**30
    budget = cfg.memory_gb if cfg.memory_gb is not None else _available_gb() / 2
    dtype = np.dtype(cfg.feature_dtype)
    if need_gb <= budget:
        feats = MemoryFeatures(cache.read("pooled", dtype=dtype), labels, train_rows)
        mode = "memory"
        view0 = feats.pooled[:, 0]
    else:
        shards = list(cache.iter_shards())
        order = [u for s in shards for u in s.utterances]
        if order != list(cache.utterances):
            raise FitError(f"{cache_dir}: shard order differs from the cache's utterance list")
        window = int(budget * 2**30 / (4 * pooled_dim) / 2)
        feats = StreamedFeatures(shards, labels, labels >= 0, cache.num_views, pooled_dim, window, dtype)
        mode = "streamed"
        view0 = None

    val = None
    if cfg.val_cache is not None:
        val = external_valset(cfg.val_cache, cfg.val_trials)
    elif val_names:
        rows = np.flatnonzero(labels < 0)
        if view0 is not None:
            pooled_val = np.ascontiguousarray(view0[rows], dtype=np.float32)
        else:
            pooled_val = np.concatenate([s.read("pooled", view=0, dtype=np.float32) for s in feats.shards])[rows]
        e, t, lab = heldout_trials(speakers[rows], cfg.max_val_trials, cfg.seed)
        val = ValSet(pooled_val, e, t, lab, f"{len(val_names)} held-out training speakers")
        if lab.min() == lab.max():
            raise FitError("held-out validation trials are all one class; raise --val-speakers")
    fingerprint.update(train_speakers=len(train_names), val_speakers=val_names, features=mode)
    _write_run_header(out, cfg, fingerprint)  # on resume: the same, up to epochs/patience

    torch.manual_seed(cfg.seed)
    head = MatryoshkaHead(pooled_dim, cfg.dims).to(device)
    loss_fn = MatryoshkaMarginLoss(cfg.dims, len(train_names), dim_weights=cfg.dim_weights, margin=cfg.margin,
                                   scale=cfg.scale, subcenters=cfg.subcenters, classifier=cfg.classifier,
                                   kind=cfg.loss).to(device)
    opt = _make_optimizer(cfg, _param_groups([head, loss_fn], cfg))
    steps = len(_batch_slices(len(train_rows), cfg.batch_size))
    job = _Job(cfg=cfg, out=out, head=head, loss_fn=loss_fn,
               batches=lambda epoch: feats.epoch(cfg.seed, epoch, cfg.batch_size, device),
               embed=head, val_embed=head, val=val, num_train=len(train_rows), steps_per_epoch=steps,
               device=device, optimizer=opt, scheduler=_make_scheduler(cfg, opt, steps))
    result = _train(job, resume)
    extra = {"features": mode, "train_utterances": len(train_rows), "train_speakers": len(train_names)}
    if val is not None:
        extra["raw_eer"] = raw_eer(val)
        extra["val_source"] = val.source
    _finish(job, result, backbone, backbone_ref, extra)
    return out


# ----------------------------------------------------------------------------- end-to-end mode


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


class _SkipLog:
    """Utterances an end-to-end fit left out, each appended once to ``RUN/skipped.tsv``."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.reasons = path, {}
        if resume and path.exists():  # a resumed fit knows what it already recorded
            for line in path.read_text().splitlines()[1:]:
                utt, reason = line.split("\t")[:2]
                self.reasons[utt] = reason
        else:
            path.write_text("utt_id\treason\tdetail\n")

    def add(self, utt_id: str, reason: str, detail: str) -> None:
        if utt_id in self.reasons:
            return
        self.reasons[utt_id] = reason
        with open(self.path, "a") as f:
            f.write(f"{utt_id}\t{reason}\t{' '.join(detail.split())}\n")

    def by_reason(self) -> dict:
        return {r: list(self.reasons.values()).count(r) for r in sorted(set(self.reasons.values()))}


def _readable_batches(batches, skip) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Drop the failed crops of each batch: (wave, rows, reasons, details) -> (wave, rows).

    ``skip(row, reason, detail)`` is called for each failed crop. A batch left with fewer than
    two crops joins the next one, and a lone crop at the end joins the last batch (one batch
    is held back for that): BatchNorm needs two rows, and no readable crop is left out.
    With no failures the batches pass through unchanged.
    """
    carry, held = None, None
    for wave, rows, reasons, details in batches:
        ok = torch.tensor([not r for r in reasons], dtype=torch.bool)  # (b,)
        for k in torch.nonzero(~ok).flatten().tolist():
            skip(int(rows[k]), reasons[k], details[k])
        wave, rows = wave[ok], rows[ok]  # (b', S), (b',)
        if carry is not None:
            wave, rows = torch.cat([carry[0], wave]), torch.cat([carry[1], rows])
            carry = None
        if len(rows) < 2:
            carry = (wave, rows) if len(rows) else None
            continue
        if held is not None:
            yield held
        held = (wave, rows)
    if carry is not None and held is not None:
        held = (torch.cat([held[0], carry[0]]), torch.cat([held[1], carry[1]]))
    if held is None:
        raise FitError("fewer than 2 training utterances have readable audio; see skipped.tsv in the run directory")
    yield held


def fit_end_to_end(data, dims: Sequence[int], out, *, variant: str | None = None, weights: str | None = None,
                   random_init: bool = False, train_type: str = "ptn", dataset: str = "vox2",
                   crop_seconds: float = 2.0, views: int = 4, augment=None, workers: int = 0,
                   unfreeze_after: int | None = None, backbone_lr: float = 1e-5, grad_accum: int = 1,
                   min_seconds: float = 0.5, resume: bool = False, **options) -> Path:
    """Fit the head (and optionally the backbone) on audio crops; returns the run directory.

    The same head, loss, schedule, validation (held-out speakers, clean view-0 crops) and
    run files as :func:`fit`. Each epoch every training utterance contributes view ``v`` of
    ``views``, drawn exactly as the cache mode draws cached views, and the crop is the one
    ``mrlcache extract`` would make for (seed, utt_id, v): with a frozen backbone the two
    modes see the same data.

    Args:
        data: VoxCeleb-style tree (``mrlcache.corpus.scan_tree``).
        variant / weights / random_init: the backbone (a published name, a file, or the
            named configuration with random weights from ``seed``).
        crop_seconds, views, augment: as ``mrlcache extract`` (augment: AugmentConfig).
        workers: DataLoader workers decoding and augmenting.
        unfreeze_after: train the backbone from this epoch on (None: frozen throughout),
            with learning rate ``backbone_lr`` under the same schedule.
        grad_accum: batches per optimiser step.
        min_seconds: shorter files are left out as "too_short" (as ``mrlcache extract``).

    Files that give no usable wave (unreadable, empty, truncated, silent, too short) are
    left out of training and validation, each listed once in ``RUN/skipped.tsv`` and
    counted in ``summary.json``; the fit goes on.
    """
    from mrlcache.corpus import scan_tree
    from mrlcache.backbone import state_sha256
    from mrlcache.backbone.loading import load_backbone, save_checkpoint

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(FitConfig)})
    if unknown:
        raise FitError(f"unknown fit option(s): {', '.join(unknown)}")
    cfg = FitConfig(dims=tuple(dims), **options)
    cfg.extra = {"mode": "end-to-end", "data": str(data), "variant": variant, "weights": weights,
                 "random_init": random_init, "train_type": train_type, "dataset": dataset,
                 "crop_seconds": crop_seconds, "views": views,
                 "augment": augment.to_dict() if augment is not None else None,
                 "unfreeze_after": unfreeze_after, "backbone_lr": backbone_lr, "grad_accum": grad_accum,
                 "min_seconds": min_seconds}
    cfg.check()
    if cfg.val_cache is not None:
        raise FitError("end-to-end mode validates on held-out training speakers: use --val-speakers, "
                       "not --val-cache (cached vectors go stale once the backbone trains)")
    if grad_accum < 1 or views < 1 or crop_seconds <= 0:
        raise FitError("grad_accum and views must be >= 1 and crop_seconds > 0")
    if sum(bool(x) for x in (variant, weights)) != 1:
        raise FitError("end-to-end mode needs exactly one of --variant NAME or --weights PATH")
    out = Path(out)
    device = _resolve_device(cfg.device)
    utts = scan_tree(data)
    if not utts:
        raise FitError(f"--data {data}: no audio files found")
    if random_init:
        backbone = load_backbone(variant, random_init=True, seed=cfg.seed)
    else:
        backbone = load_backbone(weights or variant, train_type=train_type, dataset=dataset)
    backbone_ref = None if random_init else {"source": str(Path(weights).resolve()) if weights else variant,
                                             "train_type": train_type, "dataset": dataset}
    if cfg.dims[-1] > backbone.pooled_dim:
        raise FitError(f"dims {list(cfg.dims)}: largest dim exceeds the backbone's pooled size {backbone.pooled_dim}")
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)

    speakers = np.array([u.speaker for u in utts])
    names = sorted(set(speakers.tolist()))
    n_val = cfg.val_speakers
    if n_val is None:
        n_val = min(200, max(2, len(names) // 20)) if len(names) >= 6 else 0
    if n_val and n_val > len(names) - 2:
        raise FitError(f"--val-speakers {n_val}: {data} has only {len(names)} speakers; keep at least 2 for training")
    cfg.val_speakers = int(n_val)
    pick = np.random.default_rng(cfg.seed).permutation(len(names))[:n_val]
    val_names = {names[k] for k in pick}
    train_names = [s for s in names if s not in val_names]
    cls = {s: k for k, s in enumerate(train_names)}
    labels = np.array([cls.get(s, -1) for s in speakers], np.int64)
    train_rows = np.flatnonzero(labels >= 0)

    # Backbone identity for the fingerprint: the file's SHA-256, or the random weights' bytes.
    sha = backbone.weights_sha256 or state_sha256(backbone)
    fingerprint = {"data": str(Path(data).resolve()), "utterances": len(utts), "weights_sha256": sha,
                   "model_config": backbone.model_config, "pooled_dim": backbone.pooled_dim,
                   "cache_meta_sha256": meta_hash({"data": str(Path(data).resolve()), "utts": len(utts),
                                                   "sha": sha, **cfg.extra}),
                   "train_speakers": len(train_names), "val_speakers": sorted(val_names), "features": "end-to-end"}
    resume = _prepare_out(out, cfg, resume, fingerprint)
    _write_run_header(out, cfg, fingerprint)
    if random_init and not resume:
        save_checkpoint(backbone, out / "backbone.pt")  # the weights the run started from
    skips = _SkipLog(out / "skipped.tsv", resume)

    paths = [u.path for u in utts]
    ids = [u.utt_id for u in utts]
    crop = int(round(crop_seconds * 16000))

    def loader(items):
        # The cache mode's batch boundaries (a lone last crop joins the previous batch).
        slices = [list(range(s.start, s.stop)) for s in _batch_slices(len(items), cfg.batch_size)]
        ds = _CropDataset(paths, ids, items, cfg.seed, crop, augment, min_seconds)
        return torch.utils.data.DataLoader(ds, batch_sampler=slices, num_workers=workers)

    labels_t = torch.from_numpy(labels)

    def batches(epoch):
        # The cache mode's draw: one view per utterance, then a permutation of training rows.
        # Bad files stay in the draw (so the draw does not depend on what failed before) and
        # are dropped from their batch each epoch; recorded once.
        g = _epoch_generator(cfg.seed, epoch)
        v = torch.randint(views, (len(utts),), generator=g).numpy()
        order = train_rows[torch.randperm(len(train_rows), generator=g).numpy()]
        crops = loader(np.stack([order, v[order]], 1))
        for wave, rows in _readable_batches(crops, lambda row, r, d: skips.add(ids[row], r, d)):
            yield wave.to(device), labels_t[rows].to(device)

    torch.manual_seed(cfg.seed)
    head = MatryoshkaHead(backbone.pooled_dim, cfg.dims).to(device)
    loss_fn = MatryoshkaMarginLoss(cfg.dims, len(train_names), dim_weights=cfg.dim_weights, margin=cfg.margin,
                                   scale=cfg.scale, subcenters=cfg.subcenters, classifier=cfg.classifier,
                                   kind=cfg.loss).to(device)
    groups = _param_groups([head, loss_fn], cfg)
    if unfreeze_after is not None:
        # Backbone groups exist from the start with their own lr; frozen parameters have no
        # gradient, so the optimiser skips them until unfreezing.
        groups += _param_groups([backbone], cfg, lr=backbone_lr)
    opt = _make_optimizer(cfg, groups)
    n_batches = len(_batch_slices(len(train_rows), cfg.batch_size))
    opt_steps = math.ceil(n_batches / grad_accum)

    state = {"unfrozen": False}

    def on_epoch_start(epoch):
        if unfreeze_after is not None and epoch >= unfreeze_after and not state["unfrozen"]:
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
    val_set = _CropDataset(paths, ids, np.stack([val_rows, np.zeros_like(val_rows)], 1), cfg.seed, crop, None,
                           min_seconds)
    val_items = [val_set[k] for k in range(len(val_set))]  # clean view-0 crops
    for wave, row, reason, detail in val_items:
        if reason:
            skips.add(ids[row], reason, detail)
    val_rows = np.array([row for _, row, reason, _ in val_items if not reason], np.int64)
    if len(val_rows):
        val_waves = np.stack([wave.numpy() for wave, _, reason, _ in val_items if not reason])  # (N, S)
        e, t, lab = heldout_trials(speakers[val_rows], cfg.max_val_trials, cfg.seed)
        if lab.min() == lab.max():
            raise FitError("held-out validation trials are all one class; raise --val-speakers")
        val = ValSet(val_waves, e, t, lab, f"{len(val_names)} held-out speakers, clean {crop_seconds}s crops",
                     batch=32)

    def val_embed(wave):
        backbone.eval()
        out_ = head(backbone.pooled(wave))
        backbone.train(state["unfrozen"])
        return out_

    job = _Job(cfg=cfg, out=out, head=head, loss_fn=loss_fn, batches=batches, embed=embed, val_embed=val_embed,
               val=val, num_train=len(train_rows), steps_per_epoch=n_batches, device=device, optimizer=opt,
               scheduler=_make_scheduler(cfg, opt, opt_steps),
               extra_modules={"backbone": backbone} if unfreeze_after is not None else {},
               on_epoch_start=on_epoch_start, grad_accum=grad_accum)
    result = _train(job, resume)
    extra = {"features": "end-to-end", "train_utterances": len(train_rows), "train_speakers": len(train_names),
             "skipped": len(skips.reasons), "skipped_by_reason": skips.by_reason()}
    _finish(job, result, backbone, backbone_ref, extra)
    if skips.reasons:
        reasons = ", ".join(f"{r}: {n}" for r, n in extra["skipped_by_reason"].items())
        print(f"skipped {len(skips.reasons)} of {len(utts)} utterances with no usable audio ({reasons}); "
              f"listed in {out / 'skipped.tsv'}", file=sys.stderr)
    return out
