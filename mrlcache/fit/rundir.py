"""The run directory of a fit: its lock, resume checks, header files, skip log and results.

Files: ``config.yaml`` (the one resolved config of the run), ``fingerprint.json`` (what it
was fitted on), ``history.jsonl``, TensorBoard events, ``last.pt`` (resumable),
``best.pt``, ``model.pt`` (see :mod:`mrlcache.models.model`), ``summary.json``, ``curves.png``,
``model_summary.{json,txt}`` (:mod:`mrlcache.fit.report`); a gating fit also ``gating.{json,png}``;
end to end also ``skipped.tsv``; and ``.fit.lock``, locked while a fit writes the directory.

The lock is a POSIX record lock (``fcntl.lockf``): it belongs to the fitting process, is
not inherited by DataLoader workers, and is released by the kernel when that process ends
in any way (a killed fit leaves no stale lock; the empty file stays).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path

import yaml

from mrlcache import distributed
from mrlcache.components import flat, plain
from mrlcache.fit.config import FitConfig, FitError, flat_options
from mrlcache.fit.loop import load_checkpoint
from mrlcache.fit.validate import split_speakers
from mrlcache.models.model import save_model

LOCK_NAME = ".fit.lock"
_HELD: dict[str, int] = {}  # run directories this process has locked -> lock file descriptor

# Options that may change on --resume: they do not change what an epoch computes
# (memory_gb only chooses how features are read, mrlcache.fit.data).
# batch_size and world_size may change together (resume on another number of ranks): their
# product (x grad_accum), effective_batch, must not.
RESUME_FREE = {"epochs", "patience", "progress", "device", "val_every", "cache", "end_to_end.workers",
               "batch_size", "world_size", "dist_timeout", "memory_gb"}


def run_config(cfg, e2e=None, cache_dir=None) -> dict:
    """The run's one resolved config (config.yaml and last.pt): every option, by mode, and the
    processes (torchrun) with the effective batch: rows per optimiser step over all of them."""
    from mrlcache import distributed

    accum = e2e.grad_accum if e2e is not None else 1
    return {**cfg.to_dict(), "mode": "end-to-end" if e2e is not None else "cache", "world_size": distributed.world(),
            "effective_batch": distributed.global_batch(cfg.optim.batch_size) * accum,
            "cache": str(cache_dir) if cache_dir is not None else None,
            "end_to_end": e2e.to_dict() if e2e is not None else None}


def meta_hash(meta: dict) -> str:
    """SHA-256 of the cache metadata as canonical JSON."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


class RunLock:
    """Exclusive, per-process lock of a run directory; refuses a second writer at once."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.key = str(self.out.resolve())
        self.fd = None

    def acquire(self) -> "RunLock":
        if self.key in _HELD:  # record locks do not conflict within one process: check here
            raise FitError(f"{self.out}: another fit in this process is writing this run directory; "
                           "choose another --out")
        fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise FitError(f"{self.out}: another fit (pid {holder or '?'}) is writing this run directory; "
                               "wait for it to end or choose another --out") from None
            raise FitError(f"{self.out}: cannot lock {LOCK_NAME} ({err.strerror})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        _HELD[self.key] = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            _HELD.pop(self.key, None)
            os.close(self.fd)  # closing drops the record lock
            self.fd = None

    def __enter__(self):
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc):
        self.release()


def _flatten(config: dict) -> dict:
    """A run's config.yaml, of this version (nested) or an earlier one (flat), as flat keys,
    the end-to-end options as ``end_to_end.NAME``."""
    flat = {}
    for k, v in flat_options(config).items():
        if k == "end_to_end" and isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def open_run(out: Path, config: dict, resume: bool, fingerprint: dict):
    """Create and lock the run directory and check it; returns (lock, whether to resume).

    The caller releases the lock when the fit ends (``with lock:``). On N ranks rank 0
    does this and holds the lock; the others get its answer (or its error) and a no-op lock.
    """
    held = {}

    def opened():
        held["lock"], answer = _open_run(out, config, resume, fingerprint)
        return answer

    resume = distributed.from_main(opened, f"opening {out}")
    return held.get("lock", contextlib.nullcontext()), resume


def _open_run(out: Path, config: dict, resume: bool, fingerprint: dict) -> tuple[RunLock, bool]:
    from mrlcache.paths import check_run_dir

    if resume and not (out / "last.pt").exists():
        raise FitError(f"--resume: {out}/last.pt does not exist; start the fit without --resume")
    check_run_dir(out)  # never over a cache, a finished run without last.pt, or another program's files
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out).acquire()  # first: a running fit is reported as such
    try:
        if not resume and (out / "last.pt").exists():
            raise FitError(f"{out} already holds a fit; pass --resume to continue it or choose another --out")
        resume = _check_resume(out, config, fingerprint) if resume else False
    except BaseException:
        lock.release()
        raise
    return lock, resume


def _check_resume(out: Path, config: dict, fingerprint: dict) -> bool:
    old = json.loads((out / "fingerprint.json").read_text())
    if old.get("cache_meta_sha256") != fingerprint["cache_meta_sha256"]:
        raise FitError(f"--resume: {out} was fitted on another cache (metadata hash differs)")
    old_cfg = _flatten(yaml.safe_load((out / "config.yaml").read_text()))
    # A run from before effective_batch was recorded ran on one process.
    accum = old_cfg.get("end_to_end.grad_accum") or 1
    defaults = {k: plain(v) for k, v in flat(FitConfig()).items()}
    old_cfg.setdefault("effective_batch", old_cfg.get("batch_size", defaults["batch_size"]) * accum)
    # Options that change what an epoch computes must match; epochs/patience may grow.
    # A key a run from before it existed lacks matches when it holds today's default.
    new_cfg = _flatten(config)
    changed = sorted(k for k, v in new_cfg.items() if k not in RESUME_FREE
                     and old_cfg.get(k, defaults.get(k)) != v)
    if "effective_batch" in changed:
        ranks = config.get("world_size", 1)
        raise FitError(f"--resume: {out} trained with an effective batch of {old_cfg['effective_batch']} rows "
                       f"per step; now {config['effective_batch']} (--batch-size {new_cfg['batch_size']} x {ranks} "
                       f"rank(s)); on {ranks} rank(s) give --batch-size "
                       f"{old_cfg['effective_batch'] // ranks // (config.get('end_to_end') or {}).get('grad_accum', 1)}")
    if changed:
        raise FitError(f"--resume: options differ from {out}/config.yaml: {', '.join(changed)}")
    return True


def write_header(out: Path, config: dict, fingerprint: dict) -> None:
    """``config.yaml`` (the resolved options) and ``fingerprint.json`` (the inputs); rank 0 only."""
    if not distributed.is_main():
        return
    (out / "config.yaml").write_text("# mrlcache fit: resolved options\n" + yaml.safe_dump(config, sort_keys=True))
    (out / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


class SkipLog:
    """Utterances an end-to-end fit left out, each appended once to ``RUN/skipped.tsv``."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.reasons = path, {}
        self.main, self.new = distributed.is_main(), []  # N ranks: rank 0 writes, the others report
        if resume and path.exists():  # a resumed fit knows what it already recorded
            for line in path.read_text().splitlines()[1:]:
                utt, reason = line.split("\t")[:2]
                self.reasons[utt] = reason
        elif self.main:
            path.write_text("utt_id\treason\tdetail\n")

    def add(self, utt_id: str, reason: str, detail: str) -> None:
        if utt_id in self.reasons:
            return
        self.reasons[utt_id] = reason
        self.new.append([utt_id, reason, " ".join(detail.split())])
        if self.main:
            with open(self.path, "a") as f:
                f.write(f"{utt_id}\t{reason}\t{self.new[-1][2]}\n")

    def sync(self) -> None:
        """N ranks: every rank learns what the others left out; rank 0 appends those to the file."""
        if distributed.world() == 1:
            return
        for rows in distributed.all_gather_json(self.new, "collecting skipped files"):
            for utt_id, reason, detail in rows:
                self.add(utt_id, reason, detail)
        self.new = []

    def by_reason(self) -> dict:
        return {r: list(self.reasons.values()).count(r) for r in sorted(set(self.reasons.values()))}


def finish(job, result: dict, backbone, backbone_ref, extra_summary: dict, ptm: dict | None = None):
    """Write model.pt from best.pt, summary.json, curves.png, model_summary.{json,txt}, and
    print the final table; returns the head with the best weights (on the CPU, eval mode).

    On N ranks rank 0 writes and the others return None once it has (or raise its error).
    """
    held = {}

    def written():
        held["head"] = _finish(job, result, backbone, backbone_ref, extra_summary, ptm)
        return True

    distributed.from_main(written, "writing the run's files")
    return held.get("head")


def _selected_by(job) -> str:
    if job.val is None:
        return "last epoch (no validation)"
    if job.score_start:
        return ("val EER no worse than epoch 0 at any dim and on average one standard error better, "
                "then the lowest mean ratio to epoch 0")
    return "val mean EER"


def _finish(job, result: dict, backbone, backbone_ref, extra_summary: dict, ptm: dict | None = None):
    from mrlcache.fit.report import write_curves, write_model_summary

    cfg, out = job.cfg, job.out
    best_state = load_checkpoint(out / "best.pt")
    head = copy.deepcopy(job.head).cpu()
    head.load_state_dict(best_state["head"])
    if "backbone" in best_state.get("extra", {}) and backbone is not None:
        backbone.load_state_dict(best_state["extra"]["backbone"])
        after = ((job.config or {}).get("end_to_end") or {}).get("unfreeze_after")
        if after is not None and int(best_state["epoch"]) >= int(after):
            # The selected epoch trained the backbone: the recorded SHA-256 names the weights it
            # started from; save_model records the trained weights' own, so their caches refuse.
            backbone.weights_sha256 = None
    save_model(out / "model.pt", head, backbone=backbone, embed_backbone=cfg.run.embed_backbone,
               backbone_ref=backbone_ref, ptm=ptm)
    summary = {"best_epoch": result["best"]["epoch"], "best": result["best"],
               "epochs_run": len(result["history"]), "stopped_early": result["stopped_early"],
               "selected_by": _selected_by(job),
               **({"start": result["start"], "guard_dim": job.guard_dim} if result.get("start") else {}),
               **extra_summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_curves(result["history"], job.loss_fn.dims, out / "curves.png")  # resumed: every epoch
    write_model_summary({"head": head, "loss": job.loss_fn, **job.modules}, out)
    if cfg.run.progress and job.val is not None and result["best"]["mean_eer"] is not None:
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
            table.add_row(f"raw {job.head.pooled_dim or ''}", f"{100 * extra_summary['raw_eer']:.2f}", "")
        Console(stderr=True).print(table)
    return head.eval()


def recorded_sha256(meta: dict) -> str | None:
    """The SHA-256 of the weights (or imported file) the cache's vectors came from."""
    from mrlcache.backbone import BackboneRecord

    record = BackboneRecord.from_meta(meta)
    return record.sha256 if record is not None else None


def is_imported(meta: dict) -> bool:
    """Vectors another toolkit made (``mrlcache import-vectors``): no backbone to embed in model.pt."""
    return meta.get("mode") == "imported"


def split_and_open(cfg, speakers, cache_dir, out: Path, resume: bool, fingerprint: dict):
    """The held-out speaker split of a cache fit (none with an external validation set) and the
    locked run directory: (val_names, train_names, labels, config, lock, resume)."""
    val_names, train_names, labels, n_val = split_speakers(
        speakers, cfg.val.val_speakers if cfg.val.val_cache is None else 0, cfg.run.seed, f"the cache {cache_dir}")
    if cfg.val.val_cache is None:
        cfg.val.val_speakers = n_val
    config = run_config(cfg, cache_dir=cache_dir)
    lock, resume = open_run(out, config, resume, fingerprint)
    return val_names, train_names, labels, config, lock, resume
