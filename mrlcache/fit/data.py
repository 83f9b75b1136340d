"""Training features of a cache fit: one container for every stream, in memory or streamed.

Each epoch every training utterance contributes one of its cached views, drawn at random
from :func:`epoch_generator` ``(seed, epoch)``, so augmentation costs nothing at fit time
and a resumed fit draws exactly what an uninterrupted one does. :class:`Features` holds the
streams a head reads (``pooled`` alone, or any mix such as ``layers,fbank,f0``) and yields
batches ``({stream: (b, ...) float32}, labels)``.

The order of an epoch is :func:`epoch_plan`: with a shuffle window covering every shard,
one permutation of all training rows; with a window of ``w`` shards, the shards in a
random order, ``w`` at a time, rows permuted within each window (rows left over from a
window's last full batch join the next window). Where the rows come from is a policy:
``memory`` holds every view of every row in the stored dtype; ``streamed`` reads one
window at a time while the previous window trains (a reading thread), and holds only the
training rows, each in the view the epoch drew for it. Each drawn view of a shard is one
read of the chunks holding its rows: for the pooled vectors (one chunk per view) the
whole view, sequentially, so with 6 views an epoch reads every byte of the cache and keeps
a sixth: measured faster than fetching only the drawn rows (benchmarks/README.md, issue
22). Both give the same batches for the same window,
so the memory budget (``--memory-gb``) only decides the policy and the window
(:func:`plan_features`); it never refuses a fit. A cache that fits the budget is read in
memory with one window (one permutation of every row, as every fit before streaming).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mrlcache import distributed
from mrlcache.fit.batches import batch_slices  # noqa: F401 (its callers import it from here)

GB = 2**30


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    # One generator per epoch (and per use: 0 data, 1 class sampling), so a resumed fit
    # draws exactly what an uninterrupted one does.
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + int(stream) * 2**40)


def epoch_plan(g: torch.Generator, sizes: np.ndarray, train_mask: np.ndarray, num_views: int, window: int,
               batch_size: int):
    """The draws of one epoch: (views (N,) drawn per row, [(shards of a window, [batch rows...])]).

    Rows are positions in cache order; ``window``: shards per window (>= the number of
    shards: one permutation of every training row).
    """
    n = int(sizes.sum())
    views = torch.randint(num_views, (n,), generator=g).numpy()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if window >= len(sizes):
        train_rows = np.flatnonzero(train_mask)
        order = train_rows[torch.randperm(len(train_rows), generator=g).numpy()]
        return views, [(np.arange(len(sizes)), distributed.global_batches(order, batch_size))]
    shard_order = torch.randperm(len(sizes), generator=g).numpy()
    plan, carry = [], np.empty(0, np.int64)
    for w in range(0, len(shard_order), window):
        shards = shard_order[w:w + window]
        rows = np.concatenate([carry] + [offsets[k] + np.flatnonzero(train_mask[offsets[k]:offsets[k + 1]])
                                         for k in shards])
        perm = torch.randperm(len(rows), generator=g).numpy()
        last = w + window >= len(shard_order)
        step = distributed.global_batch(batch_size)  # rows of one step over every rank (torchrun)
        n_full = len(rows) if last else (len(rows) // step) * step
        plan.append((shards, distributed.global_batches(rows[perm[:n_full]], batch_size)))
        carry = rows[perm[n_full:]]
    return views, plan


@dataclass
class Block:
    """Rows in hand: their positions in cache order and {stream: (n, *item)} for the drawn views."""

    rows: np.ndarray
    arrays: dict

    def __post_init__(self):
        self._order = np.argsort(self.rows, kind="stable")
        self._sorted = self.rows[self._order]

    def take(self, rows: np.ndarray) -> dict:
        at = self._order[np.searchsorted(self._sorted, rows)]
        return {name: a[at] for name, a in self.arrays.items()}


class Features:
    """The training rows of a cache for the streams ``records`` (see the module docstring).

    Args:
        cache: an opened cache (``shards``, ``read``, ``num_views``).
        records: {stream: StreamRecord} the head reads (dense streams).
        labels: (N,) class per cached row, -1 for held-out rows.
        dtype: the dtype rows are held in (float16 or float32).
        policy: "memory" or "streamed"; window: shards per shuffle window (None: all).
    """

    def __init__(self, cache, records: dict, labels: np.ndarray, dtype, policy: str = "memory",
                 window: int | None = None):
        self.cache, self.records, self.dtype = cache, dict(records), np.dtype(dtype)
        self.shards = list(cache.shards)
        self.sizes = np.array([len(s) for s in self.shards], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.labels = np.asarray(labels, np.int64)
        self.train_mask = self.labels >= 0
        self.num_views = int(cache.num_views)
        self.policy = policy
        self.window = len(self.shards) if window is None else max(1, int(window))
        self.arrays = None
        if policy == "memory":  # every view of every row, straight into one array per stream
            self.arrays = {name: cache.read(name, dtype=self.dtype) for name in self.records}
        elif policy != "streamed":
            raise ValueError(f"policy {policy!r}: memory or streamed")

    @property
    def num_train(self) -> int:
        return int(self.train_mask.sum())

    def rows(self, rows: np.ndarray, view: int = 0, dtype=np.float32) -> dict:
        """{stream: (len(rows), *item)} of one view of ``rows`` (cache order): validation
        and gating inputs, read from the shards holding them unless held in memory."""
        rows = np.asarray(rows, np.int64)
        if self.arrays is not None:
            return {n: np.ascontiguousarray(a[rows, view], dtype=dtype) for n, a in self.arrays.items()}
        return {n: self.cache.read(n, view=view, rows=rows, dtype=dtype) for n in self.records}

    def _read_window(self, shards, views: np.ndarray, carry: Block | None, carry_rows: np.ndarray,
                     wanted: np.ndarray | None = None) -> Block:
        """The training rows of ``shards`` (those of ``wanted`` (N,) bool, default all) with the
        views the epoch drew for them, plus the carried rows, in one array per stream filled in place."""
        wanted = self.train_mask if wanted is None else wanted
        locals_ = {int(k): np.flatnonzero(wanted[self.offsets[k]:self.offsets[k + 1]]) for k in shards}
        rows = np.concatenate([carry_rows] + [self.offsets[k] + locals_[k] for k in sorted(locals_)])
        arrays = {name: np.empty((len(rows), *r.item_shape), self.dtype) for name, r in self.records.items()}
        start = len(carry_rows)
        if start:
            for name, a in carry.take(carry_rows).items():
                arrays[name][:start] = a
        for k in sorted(locals_):
            local = locals_[k]
            drawn = views[self.offsets[k] + local]
            for name in self.records:
                block = arrays[name][start:start + len(local)]
                for view in np.unique(drawn):  # each needed view of the shard read once, in order
                    sel = np.flatnonzero(drawn == view)
                    # the rows that drew it: the chunks holding them (a pooled view: one chunk, read whole)
                    block[sel] = self.shards[k].read(name, view=int(view), rows=local[sel], dtype=self.dtype)
            start += len(local)
        return Block(rows, arrays)

    def epoch(self, seed: int, epoch: int, batch_size: int, device) -> Iterator[tuple[dict, torch.Tensor]]:
        """Yield ({stream: (b, *item) float32 on device}, labels (b,)) covering every training row once."""
        views, plan = epoch_plan(epoch_generator(seed, epoch), self.sizes, self.train_mask, self.num_views,
                                 self.window, batch_size)
        labels = torch.from_numpy(self.labels)
        if self.arrays is not None:
            flat = {n: a.reshape(-1, *a.shape[2:]) for n, a in self.arrays.items()}  # views, no copies
            for _, batches in plan:
                for rows in map(distributed.my_part, batches):  # on N ranks, this rank's part
                    at = rows * self.num_views + views[rows]
                    yield {n: _float(f, at, device) for n, f in flat.items()}, labels[rows].to(device)
            return
        plan = [(shards, [distributed.my_part(b) for b in batches]) for shards, batches in plan]
        wanted = None  # N ranks (torchrun): each reads only the rows of its own parts
        if distributed.world() > 1:
            wanted = np.zeros(len(self.labels), bool)
            wanted[np.concatenate([b for _, batches in plan for b in batches])] = True
        with ThreadPoolExecutor(1) as pool:  # the next window is read while this one trains
            block, carry_rows = None, np.empty(0, np.int64)
            pending = pool.submit(self._read_window, plan[0][0], views, None, carry_rows, wanted)
            for i, (_, batches) in enumerate(plan):
                block = pending.result()
                used = np.concatenate(batches) if batches else np.empty(0, np.int64)
                carry_rows = np.setdiff1d(block.rows, used)  # rows this window leaves to the next
                if i + 1 < len(plan):
                    pending = pool.submit(self._read_window, plan[i + 1][0], views, block, carry_rows, wanted)
                for rows in batches:
                    got = block.take(rows)
                    yield {n: _float(a, None, device) for n, a in got.items()}, labels[rows].to(device)


def _float(src: np.ndarray, at, device) -> torch.Tensor:
    """Rows ``src[at]`` (all when None) as a float32 tensor on ``device``."""
    rows = src if at is None else np.take(src, at, axis=0)
    return torch.from_numpy(np.ascontiguousarray(rows)).float().to(device, non_blocking=True)


def available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 4.0


@dataclass
class MemoryPlan:
    """What a fit holds, in bytes, and the policy and window chosen for the budget."""

    policy: str
    window: int | None  # shards per shuffle window (None: all)
    features: int  # rows held: every view of every row (memory) or two windows (streamed)
    batches: int  # float32 batches and their gathers
    model: int  # parameters, gradients, optimiser state and activations of one batch
    budget: int

    @property
    def total(self) -> int:
        return self.features + self.batches + self.model

    def to_dict(self) -> dict:
        """summary.json's ``memory``: the policy, the window and the estimate in bytes."""
        return {"policy": self.policy, "window_shards": self.window, "features_bytes": self.features,
                "batches_bytes": self.batches, "model_bytes": self.model, "estimate_bytes": self.total,
                "budget_bytes": self.budget}

    def describe(self) -> str:
        window = "every shard" if self.window is None else f"{self.window} shard(s)"
        return (f"{self.policy}, shuffle window {window}: features {self.features / GB:.3g} GB + batches "
                f"{self.batches / GB:.3g} GB + model {self.model / GB:.3g} GB of a {self.budget / GB:.3g} GB budget")


def plan_features(cache, records: dict, dtype, batch_size: int, model_bytes: int, memory_gb: float | None) -> MemoryPlan:
    """Choose in memory or streamed, and the window, for ``memory_gb`` (None: half the available memory).

    In memory when every view of every row plus the batches and the model fit the budget;
    otherwise streamed with as many shards per window as two windows (one training, one
    being read) allow, at least one: the budget never refuses a fit.
    """
    itemsize = np.dtype(dtype).itemsize
    views, n = int(cache.num_views), len(cache)
    row = sum(r.row_bytes(1, itemsize) for r in records.values())  # one view of one row
    row32 = sum(r.row_bytes(1, 4) for r in records.values())
    batches = 3 * (batch_size + 1) * row32  # the float32 batch, its gather and the device copy
    budget = int((memory_gb if memory_gb is not None else available_gb() / 2) * GB)
    whole = n * views * row
    if whole + batches + model_bytes <= budget:
        return MemoryPlan("memory", None, whole, batches, model_bytes, budget)
    largest = max((len(s) for s in cache.shards), default=1)
    # a window holds its rows (one view each); the read of one view of a shard is transient
    per_shard = largest * row
    spare = budget - batches - model_bytes - largest * row
    window = max(1, int(spare // (2 * per_shard))) if spare > 0 else 1
    window = min(window, max(1, len(cache.shards)))
    return MemoryPlan("streamed", window, 2 * window * per_shard + largest * row, batches, model_bytes, budget)


def model_bytes(model: torch.nn.Module, loss: torch.nn.Module, batch_size: int, activations_per_row: int) -> int:
    """Parameters, gradients and two optimiser states of ``model`` and ``loss`` (float32), and
    ``activations_per_row`` float32 values per row of a batch kept for the backward pass."""
    params = sum(p.numel() for m in (model, loss) for p in m.parameters())
    return 4 * (4 * params + batch_size * activations_per_row)
