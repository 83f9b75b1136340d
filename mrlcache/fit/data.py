"""Training features of a cache fit: one container for every stream, in memory or streamed.

Each epoch every training utterance contributes one of its cached views, drawn at random
from :func:`epoch_generator` ``(seed, epoch)``, so augmentation costs nothing at fit time
and a resumed fit draws exactly what an uninterrupted one does. :class:`Features` holds the
streams a head reads (``pooled`` alone, or any mix such as ``layers,fbank,f0``) and yields
batches ``({stream: (b, ...) float32}, labels)``.

The order of an epoch is :func:`epoch_plan`, a function of the seed, the epoch and the
shuffle group (``--shuffle-gb``, a setting of the data: :func:`shuffle_group`), never of
the memory budget. A cache whose features (every view, in ``--feature-dtype``) fit
``--shuffle-gb`` is one group: one permutation of all training rows, as every fit before
streaming. A larger cache is cut into groups of ``g`` shards: the shards in a random
order, ``g`` at a time, rows permuted within each group (rows left over from a group's
last full batch join the next group).

Where the rows come from is a policy the budget (``--memory-gb``, :func:`plan_features`)
chooses, and it never changes a batch: ``memory`` holds every view of every row in the
stored dtype; ``streamed`` reads a group in passes, each pass holding only the rows of the
next run of batches that fits the budget, each in the view the epoch drew for it, read
shard by shard in cache order and in the cache's dtype while the previous pass trains (a
reading thread). Each pass reads only the bytes of its own rows in the views they drew
(byte ranges of the uncompressed chunks, one read per run of adjacent rows:
:mod:`mrlcache.cache.byteranges`), so an epoch reads about one view of each training row
whatever the number of passes; whole chunks, as before, read every drawn view of every
shard of the group once per pass, ``p`` times the cache for ``p`` passes (measured:
benchmarks/README.md, issue 22). Under torchrun each rank reads only the rows of its own
parts of the batches.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mrlcache import distributed
from mrlcache.fit.batches import batch_slices  # noqa: F401 (its callers import it from here)
from mrlcache.fit.memory import return_free_memory


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    # One generator per epoch (and per use: 0 data, 1 class sampling), so a resumed fit
    # draws exactly what an uninterrupted one does.
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + int(stream) * 2**40)


def epoch_plan(g: torch.Generator, sizes: np.ndarray, train_mask: np.ndarray, num_views: int, group: int,
               batch_size: int):
    """The draws of one epoch: (views (N,) drawn per row, [(shards of a group, [batch rows...])]).

    Rows are positions in cache order; ``group``: shards per shuffle group (>= the number of
    shards: one permutation of every training row).
    """
    n = int(sizes.sum())
    views = torch.randint(num_views, (n,), generator=g).numpy()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if group >= len(sizes):
        train_rows = np.flatnonzero(train_mask)
        order = train_rows[torch.randperm(len(train_rows), generator=g).numpy()]
        return views, [(np.arange(len(sizes)), distributed.global_batches(order, batch_size))]
    shard_order = torch.randperm(len(sizes), generator=g).numpy()
    plan, carry = [], np.empty(0, np.int64)
    for w in range(0, len(shard_order), group):
        shards = shard_order[w:w + group]
        rows = np.concatenate([carry] + [offsets[k] + np.flatnonzero(train_mask[offsets[k]:offsets[k + 1]])
                                         for k in shards])
        perm = torch.randperm(len(rows), generator=g).numpy()
        last = w + group >= len(shard_order)
        step = distributed.global_batch(batch_size)  # rows of one step over every rank (torchrun)
        n_full = len(rows) if last else (len(rows) // step) * step
        plan.append((shards, distributed.global_batches(rows[perm[:n_full]], batch_size)))
        carry = rows[perm[n_full:]]
    return views, plan


def passes(batches: list, rows: int | None) -> list[list]:
    """Runs of consecutive ``batches`` of at most ``rows`` rows together (one batch at least;
    None: one run): what one streamed read holds."""
    runs, run, held = [], [], 0
    for b in batches:
        if run and rows is not None and held + len(b) > rows:
            runs.append(run)
            run, held = [], 0
        run.append(b)
        held += len(b)
    return runs + ([run] if run else [])


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
        policy: "memory" or "streamed"; group: shards per shuffle group (None: all; it sets
            the order); pass_rows: streamed, rows of this process held by one read (None: a group).
    """

    def __init__(self, cache, records: dict, labels: np.ndarray, dtype, policy: str = "memory",
                 group: int | None = None, pass_rows: int | None = None):
        self.cache, self.records, self.dtype = cache, dict(records), np.dtype(dtype)
        self.shards = list(cache.shards)
        self.sizes = np.array([len(s) for s in self.shards], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.labels = np.asarray(labels, np.int64)
        self.train_mask = self.labels >= 0
        self.num_views = int(cache.num_views)
        self.policy = policy
        self.group = len(self.shards) if group is None else max(1, int(group))
        self.pass_rows = None if pass_rows is None else max(1, int(pass_rows))
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

    def _read_pass(self, rows: np.ndarray, views: np.ndarray) -> Block:
        """``rows`` (cache positions) in the views the epoch drew for them, read shard by shard
        in cache order, each drawn view of a shard once, into one array per stream."""
        rows = np.unique(rows)
        arrays = {name: np.empty((len(rows), *r.item_shape), self.dtype) for name, r in self.records.items()}
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        bounds = np.searchsorted(shard_of, np.arange(len(self.shards) + 1))
        for k in np.unique(shard_of):
            a, b = bounds[k], bounds[k + 1]
            local, drawn = rows[a:b] - self.offsets[k], views[rows[a:b]]
            for name in self.records:
                block = arrays[name][a:b]
                for view in np.unique(drawn):
                    sel = np.flatnonzero(drawn == view)
                    # the rows that drew it: only their bytes of that view's chunks
                    block[sel] = self.shards[k].read(name, view=int(view), rows=local[sel], dtype=self.dtype)
        return Block(rows, arrays)

    def epoch(self, seed: int, epoch: int, batch_size: int, device) -> Iterator[tuple[dict, torch.Tensor]]:
        """Yield ({stream: (b, *item) float32 on device}, labels (b,)) covering every training row once."""
        views, plan = epoch_plan(epoch_generator(seed, epoch), self.sizes, self.train_mask, self.num_views,
                                 self.group, batch_size)
        labels = torch.from_numpy(self.labels)
        if self.arrays is not None:
            flat = {n: a.reshape(-1, *a.shape[2:]) for n, a in self.arrays.items()}  # views, no copies
            for _, batches in plan:
                for rows in map(distributed.my_part, batches):  # on N ranks, this rank's part
                    at = rows * self.num_views + views[rows]
                    yield {n: _float(f, at, device) for n, f in flat.items()}, labels[rows].to(device)
            return
        # The same batches, this rank's parts (torchrun), read in passes that never span two groups.
        runs = [run for _, batches in plan for run in passes([distributed.my_part(b) for b in batches],
                                                             self.pass_rows)]
        if not runs:
            return
        with ThreadPoolExecutor(1) as pool:  # the next pass is read while this one trains
            pending = pool.submit(self._read_pass, np.concatenate(runs[0]), views)
            for i, run in enumerate(runs):
                block = None  # let the pass just trained go, and give its pages back, before the next
                return_free_memory()
                block = pending.result()
                if i + 1 < len(runs):
                    pending = pool.submit(self._read_pass, np.concatenate(runs[i + 1]), views)
                for rows in run:
                    got = block.take(rows)
                    yield {n: _float(a, None, device) for n, a in got.items()}, labels[rows].to(device)


def _float(src: np.ndarray, at, device) -> torch.Tensor:
    """Rows ``src[at]`` (all when None) as a float32 tensor on ``device``."""
    rows = src if at is None else np.take(src, at, axis=0)
    return torch.from_numpy(np.ascontiguousarray(rows)).float().to(device, non_blocking=True)
