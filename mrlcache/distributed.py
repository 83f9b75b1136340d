"""N processes under torchrun: the environment, the process group, each rank's share of an epoch, DDP.

``torchrun --nproc-per-node N -m mrlcache extract|fit ...`` starts N processes with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set; this module is the one place that reads them
(:func:`env`) and sets up ``torch.distributed`` (:func:`session`: NCCL on GPUs, gloo on
the CPU, a timeout on every collective so a lost rank ends the others with a message, not a
hang). Extraction needs no more (shard k belongs to rank k % N). A fit also uses:

- :func:`rank_batches`: the epoch's order is drawn exactly as on one process, cut into
  global batches of ``batch_size x N`` rows, and rank r takes the r-th contiguous part of
  each, so N ranks x batch B see per step what one process sees with batch N*B;
- :func:`wrap`: DistributedDataParallel around what trains (gradients all-reduced and
  averaged), every BatchNorm synchronised (statistics over the global batch, :mod:`mrlcache.syncbn`), and
  :func:`loss_share`, the factor that makes a rank's loss its share of the global mean
  when the parts differ in size (the last batch, an end-to-end batch with dropped files);
- :func:`from_main`: rank 0 runs a step (validation, opening the run directory), every rank
  gets its result or its error; only rank 0 writes files (:func:`is_main`). Without
  torchrun (``WORLD_SIZE`` unset or 1) nothing here changes what a fit computes.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default: long enough for rank 0's validation


def _fit_error():
    from mrlcache.fit.config import FitError  # no torch: safe before torch loads

    return FitError


class RankLostError(_fit_error()):
    """Another rank stopped (killed, crashed, or silent past the timeout); the message says so."""


# Words of torch's communication errors (gloo, NCCL, the store): a RuntimeError carrying one
# during a distributed step is a lost rank, reported as such instead of a traceback.
_COMM_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer", "store")


def env() -> tuple[int, int, bool]:
    """(rank, world_size, launched_by_torchrun) from torchrun's environment variables; a
    malformed value is a one-line DeviceError (:func:`mrlcache.runtime.env_ranks`)."""
    from mrlcache.runtime import env_ranks

    rank_, size, _ = env_ranks()
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    return rank_, size, launched and "MASTER_ADDR" in os.environ


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> int:
    """Processes in the fit (1 without an initialised process group)."""
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    """Rank 0: the one process that validates and writes the run directory."""
    return rank() == 0


def _rendezvous_address(size: int) -> str:
    """``MASTER_ADDR:MASTER_PORT`` of a torchrun launch of ``size`` processes, checked in one line."""
    if size > 1 << 16:
        raise _fit_error()(f"WORLD_SIZE={size} in the environment is not a number of processes mrlcache can "
                           "start; launch with torchrun")
    port = os.environ.get("MASTER_PORT")
    if port is None:
        raise _fit_error()("MASTER_ADDR is set but MASTER_PORT is not: launch with torchrun (it sets both)")
    if not (port.strip().isdigit() and 1 <= int(port) <= 65535):
        raise _fit_error()(f"MASTER_PORT={port!r} in the environment is not a port (1-65535); launch with torchrun")
    return f"{os.environ['MASTER_ADDR']}:{int(port)}"


@contextmanager
def session(device: str = "auto", timeout_s: float | None = None):
    """The process group of a torchrun launch, for the duration of the block.

    Does nothing without torchrun (or with one process) or when the caller already set the
    group up. Backend: NCCL when this rank's device is a GPU, else gloo. Every collective
    waits at most ``timeout_s`` (a rank that dies closes its connections, so the others
    stop at once; the timeout covers a rank that hangs). At a clean exit the ranks meet
    once more, so none returns before rank 0 has written the run's last file.
    """
    from mrlcache.runtime import DeviceError

    try:
        rank_, size, torchrun = env()
    except DeviceError as err:
        raise _fit_error()(str(err)) from None
    if size > 1 and not torchrun:  # N processes each fitting alone would race on one run directory
        raise _fit_error()(f"RANK={rank_} WORLD_SIZE={size} are set but MASTER_ADDR is not: launch the ranks "
                           "with torchrun (it sets all of them), or unset RANK and WORLD_SIZE for one process")
    dist = None
    if torchrun and size > 1:
        address = _rendezvous_address(size)
        import torch
        import torch.distributed as dist_mod

        if not dist_mod.is_initialized():
            from mrlcache.runtime import resolve_device

            dev = resolve_device("auto" if device == "cuda" else device)  # "cuda": this rank's GPU
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
            try:
                dist_mod.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
            except (RuntimeError, ValueError) as err:  # torch's DistError family is RuntimeError
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise _fit_error()(f"rank {rank_} of {size} could not join the process group at {address} within "
                                   f"{timeout.total_seconds():g} s ({first}); start every rank with torchrun and "
                                   "check MASTER_ADDR / MASTER_PORT (or raise --dist-timeout)") from None
            dist = dist_mod
    try:
        yield
        if dist is not None:
            barrier("the end of the fit")
    finally:
        if dist is not None:
            dist.destroy_process_group()


def launched(fn):
    """Run ``fn`` (a fit entry point taking ``device=``/``dist_timeout=`` options) in :func:`session`."""

    @functools.wraps(fn)
    def run(*args, **options):
        with session(options.get("device", "auto"), options.get("dist_timeout")):
            return fn(*args, **options)

    return run


def _lost(err: Exception, where: str) -> RankLostError:
    return RankLostError(f"rank {rank()} of {world()}: another rank stopped or stopped answering during "
                         f"{where} ({' '.join(str(err).split())[:200]}); the fit is stopped: fix the cause "
                         "(see that rank's output) and start it again with --resume")


@contextmanager
def guard(where: str):
    """Turn a communication failure inside the block into a RankLostError (N ranks only)."""
    try:
        yield
    except RuntimeError as err:
        if world() > 1 and any(
                w in str(err).lower() for w in _COMM_WORDS):
            raise _lost(err, where) from None
        raise


def barrier(where: str) -> None:
    """Wait for every rank; RankLostError if one is gone."""
    dist = _dist()
    if dist is None:
        return
    try:
        dist.barrier()
    except RuntimeError as err:
        raise _lost(err, where) from None


def all_reduce_(tensor, where: str | None):
    """Sum ``tensor`` over the ranks in place (a CPU tensor is sent through the group's device).

    A lost rank raises RankLostError naming ``where``; with ``where=None`` torch's error
    passes through, for a :func:`guard` around the step to name it.
    """
    dist = _dist()
    if dist is None:
        return tensor
    import torch

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    sent = tensor.to(dev)
    try:
        dist.all_reduce(sent)
    except RuntimeError as err:
        if where is None:
            raise
        raise _lost(err, where) from None
    tensor.copy_(sent.to(tensor.device))
    return tensor


def _broadcast_json(obj, where: str):
    """``obj`` (JSON-able) from rank 0 to every rank."""
    return _broadcast_from(obj, 0, where)


def from_main(fn, where: str):
    """``fn()`` on rank 0, its (JSON-able) result on every rank; rank 0's error raised on every rank.

    The other ranks wait meanwhile (validation, opening the run directory).
    """
    if _dist() is None:
        return fn()
    if is_main():
        try:
            value = fn()
        except BaseException as err:
            _broadcast_json({"error": f"{type(err).__name__}: {err}"}, where)
            raise
        _broadcast_json({"value": value}, where)
        return value
    got = _broadcast_json(None, where)
    if "error" in got:
        raise _fit_error()(f"rank 0 stopped during {where}: {got['error']}")
    return got["value"]


def all_gather_json(obj, where: str) -> list:
    """Every rank's ``obj`` (JSON-able), in rank order, on every rank."""
    if _dist() is None:
        return [obj]
    out = []
    for r in range(world()):  # one broadcast per rank: plain bytes, any sizes
        out.append(_broadcast_from(obj if rank() == r else None, r, where))
    return out


def _broadcast_from(obj, src: int, where: str):
    """``obj`` (JSON-able) from rank ``src`` to every rank: plain bytes, nothing is unpickled."""
    import torch

    dist = _dist()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = json.dumps(obj).encode() if rank() == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    try:
        dist.broadcast(size, src)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=dev)
        if rank() == src:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src)
    except RuntimeError as err:
        raise _lost(err, where) from None
    return json.loads(bytes(buf.cpu().numpy()).decode())


# ----------------------------------------------------------------------------- batches


def _global_slices(n: int, size: int, min_rows: int) -> list[slice]:
    """Batches of ``size`` covering 0..n; a last batch under ``min_rows`` joins the previous one."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] < min_rows:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


def global_batch(batch_size: int) -> int:
    """Rows of one step over all ranks: ``batch_size`` per rank x world size."""
    return batch_size * world()


def num_batches(n: int, batch_size: int) -> int:
    """Steps of an epoch over ``n`` rows (the same on every rank)."""
    return len(_slices(n, batch_size))


def _slices(n: int, batch_size: int) -> list[slice]:
    from mrlcache.fit.batches import batch_slices

    size = world()
    if size == 1:
        return batch_slices(n, batch_size)  # a last batch of one row joins the previous one
    if 0 < n < 2 * size:
        raise _fit_error()(f"{n} training rows cannot give each of {size} ranks two rows (BatchNorm); "
                       "use fewer processes")
    # Each rank needs two rows of the last batch: a shorter last batch joins the previous one.
    return _global_slices(n, batch_size * size, 2 * size)


def global_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The rows of each step over all ranks: ``order`` in batches of ``batch_size`` x world size.

    One process: :func:`mrlcache.fit.batches.batch_slices` (a last batch of one row joins the
    previous one). N ranks: a last batch under two rows per rank joins the previous one.
    """
    return [order[sl] for sl in _slices(len(order), batch_size)]


def my_part(rows: np.ndarray) -> np.ndarray:
    """This rank's part of a global batch: N contiguous parts whose sizes differ by at most one."""
    size = world()
    return rows if size == 1 else np.array_split(rows, size)[rank()]


def rank_batches(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """This rank's rows of each batch of ``order`` (the epoch's order of rows, drawn as on one process)."""
    for rows in global_batches(order, batch_size):
        yield my_part(rows)


def loss_share(n_local: int, device):
    """Factor on a rank's mean loss so that DDP's average of gradients is the global batch's mean.

    DDP averages the ranks' gradients; a rank holding n_r of the step's n rows weighs its
    mean loss by n_r * N / n (1 when the parts are equal). One all-reduce of the row count.
    """
    import torch

    if world() == 1:
        return 1.0
    total = all_reduce_(torch.tensor([float(n_local)], dtype=torch.float64), None)  # in the loop's guard
    return n_local * world() / float(total.item())


# ----------------------------------------------------------------------------- DDP


def _trainable_module(job):
    """What one training step runs (embedding and loss) as one module, for DDP."""
    import torch

    class Trainable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.loss_fn = job.head, job.loss_fn
            self.more = torch.nn.ModuleDict(dict(job.modules))
            self._embed = [job.embed]  # a list: job.embed may be the head itself (no second registration)

        def forward(self, x, y, classes):
            return self.loss_fn(self._embed[0](x), y, classes)

    return Trainable()


class Step:
    """The training forward of a job: ``step(x, y, classes) -> (loss, dim_loss, dim_acc)``.

    One process: the job's embed and loss, as before. N ranks: the same through
    DistributedDataParallel, re-wrapped when the set of trained parameters changes (an
    end-to-end backbone unfrozen at an epoch's start); ``no_sync()`` for accumulation.
    """

    def __init__(self, job):
        self.job = job
        self.ddp = None
        self._trained = None
        if world() > 1:
            from mrlcache.syncbn import sync_batchnorm

            for m in (job.head, job.loss_fn, *job.modules.values()):
                sync_batchnorm(m)
            self.refresh()

    def refresh(self) -> None:
        """(Re-)wrap in DDP if the parameters that train changed since the last wrap."""
        if world() == 1:
            return
        import torch

        module = _trainable_module(self.job)
        trained = tuple(id(p) for p in module.parameters() if p.requires_grad)
        if trained == self._trained:
            return
        dev = self.job.device
        # Parameters are equal on every rank already (same seed, same checkpoint): DDP's
        # initial broadcast from rank 0 is a check, not a correction. BatchNorm buffers are
        # kept equal by the synchronised statistics, so they are not broadcast each step.
        # A backbone trains through ``pooled`` only: its embedding layers get no gradient, so
        # DDP must look for unused parameters there (one graph walk per step).
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[torch.cuda.current_device()] if dev.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=bool(self.job.modules))
        self._trained = trained

    def __call__(self, x, y, classes):
        if self.ddp is None:
            return self.job.loss_fn(self.job.embed(x), y, classes)
        return self.ddp(x, y, classes)

    def no_sync(self):
        """Skip the all-reduce of a backward whose gradients only accumulate (not the step's last)."""
        from contextlib import nullcontext

        return self.ddp.no_sync() if self.ddp is not None else nullcontext()
