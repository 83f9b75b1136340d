"""The one training loop both modes share, behind one seam: :class:`TrainJob`.

A mode (cache or end to end) builds a TrainJob: what an epoch's batches are, how a batch
is embedded in training and in validation, which modules a checkpoint holds beyond the
head and loss, and a hook run at each epoch's start. :func:`train` runs the epochs: the
margin schedule (only stepped here: :class:`~mrlcache.fit.optim.MarginWarmup`), the step
(autocast, gradient accumulation, clipping, the learning-rate schedule), validation and
model selection by mean EER (a started head: :func:`selection_ratio`), ``history.jsonl``,
TensorBoard, and the checkpoints ``best.pt`` and ``last.pt``, all built by :func:`checkpoint`.

Determinism: every random draw of epoch ``e`` (views, order; the classes of
``class_sample`` from a second stream) comes from a generator seeded by ``(seed, e)``,
and ``last.pt`` holds the torch RNG state, so a fit resumed from ``last.pt`` replays the
same epochs as an uninterrupted one (bit-identical on the CPU with the same threads).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mrlcache import distributed
from mrlcache.fit.config import FitError
from mrlcache.fit.data import epoch_generator
from mrlcache.fit.losses import sample_classes
from mrlcache.fit.optim import MarginWarmup, make_optimizer, make_scheduler, param_groups
from mrlcache.fit.validate import ValSet, validate
from mrlcache.runtime import atomic_torch_save


@dataclass
class TrainJob:
    """What the training loop needs from a mode (cache or end to end)."""

    cfg: object  # FitConfig
    config: dict  # the run's resolved options, stored in last.pt (as config.yaml)
    out: Path
    head: torch.nn.Module
    loss_fn: torch.nn.Module
    batches: Callable  # batches(epoch) -> iterator of (input, labels (b,)) on the device
    embed: Callable  # embed(input) -> (b, max_dim), the training forward
    val_embed: Callable  # val_embed(val input (b, ...)) -> (b, max_dim), in eval mode
    val: ValSet | None
    steps_per_epoch: int  # batches per epoch
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: object
    modules: dict = field(default_factory=dict)  # more modules to checkpoint, e.g. {"backbone": m}
    on_epoch_start: Callable | None = None  # on_epoch_start(epoch), e.g. to unfreeze the backbone
    grad_accum: int = 1  # batches per optimiser step
    margin: MarginWarmup | None = None  # stepped at each epoch's start; default: cfg's warm-up of loss_fn
    # A head that starts from a model worth keeping (the published embedding, PCA, LDA): epoch 0
    # (before any step) is validated and may be selected (best epoch -1); a later epoch is
    # selected only if no dim is worse than epoch 0 and it is clearly better (selection_ratio). guard_dim: the published
    # size (or the largest trained dim below it), recorded in summary.json.
    score_start: bool = False
    guard_dim: int | None = None

    def __post_init__(self):
        if self.margin is None:
            self.margin = MarginWarmup(self.loss_fn, self.cfg.loss.margin, self.cfg.loss.margin_warmup_epochs)


def checkpoint(job: TrainJob, epoch: int, **more) -> dict:
    """The one checkpoint layout: epoch, head, loss and module states, plus ``more``.

    Only tensors and plain containers, so every checkpoint loads with ``weights_only=True``.
    """
    return {"epoch": epoch, "head": job.head.state_dict(), "loss": job.loss_fn.state_dict(),
            "extra": {k: m.state_dict() for k, m in job.modules.items()}, **more}


def load_checkpoint(path: Path, device="cpu") -> dict:
    """A checkpoint written by :func:`checkpoint`; tensors and plain containers only.

    Raises:
        FitError: one line for a file that is not such a checkpoint (code-carrying,
            truncated, foreign), naming it.
    """
    from mrlcache.backbone.loading import UnsafeFileError, load_plain

    try:
        state = load_plain(path, path)
    except UnsafeFileError as err:
        raise FitError(f"{err}; delete it and start the fit again") from None
    except FileNotFoundError:
        raise FitError(f"{path}: no such checkpoint") from None
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise FitError(f"{path}: not a checkpoint of mrlcache fit ({type(err).__name__}: {str(err)[:120]}); "
                       f"it is truncated or foreign: delete it and start the fit again") from None
    if not isinstance(state, dict):
        raise FitError(f"{path}: holds {type(state).__name__}, not a checkpoint of mrlcache fit")
    return state  # on the CPU: load_state_dict copies onto each module's own device


def _restore(job: "TrainJob", scaler, path: Path) -> dict:
    """Load ``last.pt`` into the job; FitError in one line when it does not fit this run."""
    state = load_checkpoint(path, job.device)
    try:
        job.head.load_state_dict(state["head"])
        job.loss_fn.load_state_dict(state["loss"])
        for name, mod in job.modules.items():
            mod.load_state_dict(state["extra"][name])
        if job.on_epoch_start:
            job.on_epoch_start(state["epoch"])  # restore e.g. the unfrozen param group first
        job.optimizer.load_state_dict(state["optimizer"])
        job.scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        start, best = int(state["epoch"]), dict(state["best"])
        mark = state.get("patience_mark", {"epoch": best["epoch"], "mean_eer": best["mean_eer"]})
        start_rec = state.get("start")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        what = f"missing {err}" if isinstance(err, KeyError) else str(err).splitlines()[0][:160]
        raise FitError(f"--resume: {path} does not match this run ({type(err).__name__}: {what}); it is damaged "
                       f"or from another fit: delete it or choose another --out") from None
    return {"start": start, "best": best, "mark": mark, "start_rec": start_rec}



def feature_job(cfg, config: dict, out: Path, model, loss_fn, feats, val, num_train: int, device,
                embed: Callable | None = None) -> TrainJob:
    """The TrainJob of a fit on cached features (cache mode, stream mode).

    ``feats.epoch(seed, epoch, batch_size, device)`` gives the batches {stream: (b, ...)};
    ``embed`` (default ``model``) embeds one, in training and validation alike; one
    optimiser covers the model and the loss, with the per-step schedule.
    """
    embed = embed or model
    opt = make_optimizer(cfg, param_groups([model, loss_fn], cfg))
    steps = distributed.num_batches(num_train, cfg.optim.batch_size)
    return TrainJob(cfg=cfg, config=config, out=out, head=model, loss_fn=loss_fn,
                    batches=lambda epoch: feats.epoch(cfg.run.seed, epoch, cfg.optim.batch_size, device),
                    embed=embed, val_embed=embed, val=val, steps_per_epoch=steps, device=device,
                    optimizer=opt, scheduler=make_scheduler(cfg, opt, steps))


def train(job: TrainJob, resume: bool) -> dict:
    """Run the epochs of ``job`` (from ``last.pt`` when resuming); returns best, history, stop."""
    cfg, out = job.cfg, job.out
    from torch.utils.tensorboard import SummaryWriter

    use_amp = job.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    autocast_dtype = torch.float16 if use_amp else (torch.bfloat16 if cfg.run.precision == "bf16" else None)

    start, best, history, restored = 0, {"epoch": None, "mean_eer": None}, [], {}
    # Early stopping: the last epoch whose mean EER beat the previous mark by more than
    # --min-delta (the selected model is still the lowest EER, however small the gain).
    mark = {"epoch": None, "mean_eer": None}
    last_path, hist_path = out / "last.pt", out / "history.jsonl"
    if resume:
        restored = _restore(job, scaler, last_path)
        start, best, mark = restored["start"], restored["best"], restored["mark"]
        # Keep only the epochs the checkpoint has seen (a crash may leave one more line).
        lines = hist_path.read_text().splitlines() if hist_path.exists() else []
        history = [json.loads(x) for x in lines if x.strip()]
        history = [h for h in history if h["epoch"] < start]
        if distributed.is_main():
            hist_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    # N ranks (torchrun): DDP around what trains; only rank 0 validates and writes files.
    step_fn, main = distributed.Step(job), distributed.is_main()
    writer = SummaryWriter(str(out / "tensorboard"), purge_step=start if resume else None) if main else None

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True, quiet=not cfg.run.progress or not main)
    dims = job.head.dims
    stopped_early = False
    floor, start_rec = None, None  # epoch 0's EER per dim: the bound a selected epoch keeps (started heads)
    if job.score_start and job.val is not None:
        if resume:
            start_rec = restored["start_rec"]
        else:
            job.head.eval()
            v = distributed.from_main(lambda: _validate(job, dims), "validation of epoch 0")
            best = {"epoch": -1, "mean_eer": v["mean_eer"], "eer": v["eer"], "min_dcf": v["min_dcf"],
                    "ratio_to_start": 1.0}
            mark, start_rec = {"epoch": -1, "mean_eer": v["mean_eer"]}, dict(best)
            if main:
                atomic_torch_save(checkpoint(job, -1, val=best), out / "best.pt")
        floor = start_rec["eer"] if start_rec else None
    for epoch in range(start, cfg.optim.epochs):
        t0 = time.perf_counter()
        if job.on_epoch_start:
            job.on_epoch_start(epoch)
        step_fn.refresh()  # an unfrozen backbone joins DDP
        margin = job.margin.step(epoch)
        job.head.train()
        job.loss_fn.train()
        sums = torch.zeros(2, len(dims), dtype=torch.float64)  # loss, accuracy per dim, x rows
        class_gen = epoch_generator(cfg.run.seed, epoch, stream=1) if cfg.loss.class_sample < 1 else None
        seen = 0
        with Progress(TextColumn(f"epoch {epoch + 1}/{cfg.optim.epochs}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, transient=True,
                      disable=not cfg.run.progress or not main) as bar, distributed.guard(f"epoch {epoch + 1}"):
            task = bar.add_task("fit", total=job.steps_per_epoch)
            pending = False  # gradients accumulated since the last optimiser step
            for step, (x, y) in enumerate(job.batches(epoch)):
                stepping = (step + 1) % job.grad_accum == 0 or step + 1 == job.steps_per_epoch
                with torch.autocast(job.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    classes = None
                    if class_gen is not None:
                        classes = sample_classes(y, job.loss_fn.num_classes, cfg.loss.class_sample,
                                                 class_gen).to(y.device)
                    loss, dim_loss, dim_acc = step_fn(x, y, classes)
                if distributed.world() > 1:
                    # This rank's share of the global batch's mean (DDP averages the ranks).
                    loss = loss * distributed.loss_share(len(y), job.device)
                # Gradient accumulation: average over grad_accum batches, then one step.
                with step_fn.no_sync() if not stepping else contextlib.nullcontext():
                    scaler.scale(loss / job.grad_accum).backward()
                pending = True
                if stepping:
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
        if distributed.world() > 1:  # the epoch's sums over every rank's rows
            seen = _reduce_sums(sums, seen)
        # A loss or weights gone NaN/Inf only get worse: stop before this epoch is saved,
        # so last.pt stays the last good epoch (checked once per epoch: no per-step sync).
        if not torch.isfinite(sums).all() or not all(torch.isfinite(p).all() for p in _trained(job)):
            kept = (f"{last_path} is kept as the last good checkpoint" if last_path.exists()
                    else "no checkpoint was written yet")
            raise FitError(f"epoch {epoch + 1}: the training loss or the weights became NaN or Inf; stopped, "
                           f"{kept}; lower --lr (or --scale, --margin), or check the cache for bad vectors")
        train_loss = (sums[0] / max(seen, 1)).tolist()
        train_acc = (sums[1] / max(seen, 1)).tolist()
        rec = {"epoch": epoch, "margin": margin, "lr": job.optimizer.param_groups[0]["lr"],
               "samples": seen, "loss": dict(zip(map(str, dims), train_loss)),
               "accuracy": dict(zip(map(str, dims), train_acc))}
        if distributed.world() > 1:
            rec.update(world_size=distributed.world(),
                       effective_batch=distributed.global_batch(cfg.optim.batch_size) * job.grad_accum)
        validating = job.val is not None and ((epoch + 1) % cfg.val.val_every == 0 or epoch + 1 == cfg.optim.epochs)
        if validating:
            job.head.eval()
            # Rank 0 validates; the others wait and take its numbers (the same selection,
            # schedule and early stop on every rank).
            v = distributed.from_main(lambda: _validate(job, dims), f"validation of epoch {epoch + 1}")
            rec["val_eer"] = {str(d): e for d, e in v["eer"].items()}
            rec["val_min_dcf"] = {str(d): e for d, e in v["min_dcf"].items()}
            rec["val_mean_eer"] = v["mean_eer"]
            if cfg.optim.scheduler == "plateau":
                job.scheduler.step(v["mean_eer"])
            if mark["mean_eer"] is None or v["mean_eer"] < mark["mean_eer"] - cfg.val.min_delta:
                mark = {"epoch": epoch, "mean_eer": v["mean_eer"]}  # patience counts from here
            if floor is None:  # selected by mean EER
                kept = best["mean_eer"] is None or v["mean_eer"] < best["mean_eer"]
            else:  # no dim worse than epoch 0, then the lowest mean ratio to it (selection_ratio)
                ratio = selection_ratio(rec["val_eer"], floor, int(job.val.labels.sum()))
                kept = ratio is not None and ratio < best.get("ratio_to_start", 1.0)
            if kept:
                best = {"epoch": epoch, "mean_eer": v["mean_eer"], "eer": rec["val_eer"],
                        "min_dcf": rec["val_min_dcf"], **({"ratio_to_start": ratio} if floor is not None else {})}
                if main:
                    atomic_torch_save(checkpoint(job, epoch, val=best), out / "best.pt")
        elif job.val is None:
            # No validation: the last epoch is the model (recorded as such in summary.json).
            best = {"epoch": epoch, "mean_eer": None}
            if main:
                atomic_torch_save(checkpoint(job, epoch, val=None), out / "best.pt")
        rec["seconds"] = time.perf_counter() - t0
        rec["samples_per_s"] = seen / rec["seconds"]
        history.append(rec)
        if main:
            with open(hist_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            _log_tensorboard(writer, rec, dims)
            atomic_torch_save(checkpoint(job, epoch + 1, optimizer=job.optimizer.state_dict(),
                                         scheduler=job.scheduler.state_dict(), scaler=scaler.state_dict(),
                                         torch_rng=torch.get_rng_state(), best=best, patience_mark=mark,
                                         config=job.config, start=start_rec), last_path)
        line = f"epoch {epoch + 1}/{cfg.optim.epochs} loss {sum(train_loss) / len(dims):.3f} " \
               f"acc {train_acc[-1]:.3f} lr {rec['lr']:.2e} {rec['seconds']:.1f}s"
        if validating:
            line += " EER% " + " ".join(f"{d}:{100 * v['eer'][str(d)]:.2f}" for d in dims)
        console.print(line)
        if (cfg.val.patience > 0 and mark["epoch"] is not None and job.val is not None
                and epoch - mark["epoch"] >= cfg.val.patience):
            stopped_early = True
            console.print(f"early stop: no better mean EER for {cfg.val.patience} epochs")
            break
    if writer is not None:
        writer.close()
    return {"best": best, "history": history, "stopped_early": stopped_early, "start": start_rec}


def selection_ratio(eer: dict, start: dict, targets: int) -> float | None:
    """How an epoch of a started head compares with epoch 0 ({dim: EER} each, on validation
    trials with ``targets`` target trials): None if it is not clearly better, else the mean
    over dims of EER / epoch 0's (below 1).

    Clearly better: no dim worse than epoch 0, and on average over dims at least one
    standard error of epoch 0's EER better (``sqrt(e (1 - e) / targets)``, the binomial
    error of a miss rate ``e`` on the target trials). Without that margin, the many epochs of
    a fit on a small validation set would often find one that is better there by chance and
    worse on new speakers (measured: benchmarks/README.md, issue 21). Selecting the lowest
    ratio of those (epoch 0 has 1) never keeps a model worse than epoch 0 at any dim on the
    validation trials: when epoch 0 is a baseline (PCA, LDA, the published embedding at
    full size), the kept model is no worse than it at every dim there.
    """
    if any(eer[d] > start[d] for d in start):
        return None
    gain = [(start[d] - eer[d]) / (start[d] * (1 - start[d]) / max(targets, 1)) ** 0.5 if start[d] > 0 else 0.0
            for d in start]
    if sum(gain) / len(gain) < 1.0:
        return None
    return float(sum(eer[d] / start[d] if start[d] > 0 else 1.0 for d in start) / len(start))


def _trained(job: "TrainJob"):
    return [p for g in job.optimizer.param_groups for p in g["params"]]


def _validate(job: TrainJob, dims) -> dict:
    """:func:`validate` with plain keys (dims as strings), as sent between ranks."""
    v = validate(job.val_embed, job.val, dims, job.device)
    return {"eer": {str(d): float(e) for d, e in v["eer"].items()},
            "min_dcf": {str(d): float(e) for d, e in v["min_dcf"].items()}, "mean_eer": float(v["mean_eer"])}


def _reduce_sums(sums: torch.Tensor, seen: int) -> int:
    """Sum the epoch's loss/accuracy sums (in place) and rows seen over the ranks; returns all rows."""
    both = distributed.all_reduce_(torch.cat([sums.flatten(), torch.tensor([float(seen)], dtype=torch.float64)]),
                                   "the end of the epoch")
    sums.copy_(both[:-1].view_as(sums))
    return int(both[-1].item())


def _optimizer_step(job: TrainJob, scaler) -> None:
    """Clip, step, zero the gradients, and advance a per-step (cosine) schedule."""
    if job.cfg.optim.grad_clip > 0:
        scaler.unscale_(job.optimizer)
        params = [p for g in job.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, job.cfg.optim.grad_clip)
    scaler.step(job.optimizer)
    scaler.update()
    job.optimizer.zero_grad(set_to_none=True)
    if job.cfg.optim.scheduler == "cosine":
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
