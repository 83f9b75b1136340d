"""What a cache fit holds, planned against ``--memory-gb`` before a feature is read.

The budget counts the whole process. :func:`plan_features` starts from what the process
already holds when it plans (:func:`process_rss`: the interpreter, torch, the cache's
index, the labels, the model's parameters) and adds what the fit will hold on top: the
held-out validation rows, the epoch's index arrays, the float32 batches, the gradients,
optimiser state and one batch's activations, the raw-cosine baseline's scoring block, the
buffers torch, oneDNN, TensorBoard and the plots take on first use (:data:`FIRST_USE`,
measured), and the features: every view of
every row (``memory``), or two reading passes (one training, one being read) and one
shard's read (``streamed``). The budget chooses only that policy and the rows of a pass,
never the order of an epoch (:mod:`mrlcache.fit.data`); a budget below what the fit needs
with one batch per pass is said in one line (:meth:`MemoryPlan.shortfall`), and the fit
runs with passes of :data:`SHORT_PASS_BYTES`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrlcache import distributed

GB = 2**30
# Buffers a fresh process takes on its first epoch, validation and run files, whatever the
# cache (torch's and oneDNN's first-use buffers, the TensorBoard writer, matplotlib's
# figure, torch.save's): measured as VmHWM minus the RSS at planning minus the rest of the
# estimate, 127-167 MB for a fit of 40,000 rows x 1024 (tests/fit/test_memory.py).
FIRST_USE = 200 * 2**20
SCORED_TRIALS = 4096  # the raw-cosine baseline scores trials in blocks of this many (mrlcache.scoring)
INDEX_BYTES_PER_ROW = 48  # an epoch's drawn views, order and batches (int64), per cached row
ROW_INDEX_BYTES = 24  # a pass's rows and their sort order (int64), per held row
# A budget below what the fit needs is exceeded anyway (and said): then a pass holds at
# least this much, so an epoch does not read the cache once per batch.
SHORT_PASS_BYTES = 64 * 2**20


def _proc_kib(path: str, key: str) -> int | None:
    """The ``key:`` line of a /proc file such as /proc/meminfo, in KiB; None where it is absent."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def process_rss() -> int:
    """Resident bytes of this process now (VmRSS); 0 where /proc is absent (not counted then)."""
    kib = _proc_kib("/proc/self/status", "VmRSS")
    return 0 if kib is None else kib * 1024


def return_free_memory() -> bool:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim``); False elsewhere.

    glibc's mmap threshold rises to the largest buffer freed so far, so after the first
    few batches large buffers come from the heap, and what is freed there stays resident:
    a fit bounded by ``--memory-gb`` calls this between streamed reads (measured: up to
    0.3 GB of a frame-stream fit's peak). A fixed low threshold would bound it too, at
    40% of a pooled fit's speed (every batch page-faulted afresh).
    """
    try:
        return bool(ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0)))
    except (OSError, AttributeError):
        return False


def available_gb() -> float:
    """The memory available to new work (MemAvailable), in GB; 4 where /proc is absent."""
    kib = _proc_kib("/proc/meminfo", "MemAvailable")
    return 4.0 if kib is None else kib / 2**20


def shuffle_group(cache, records: dict, dtype, shuffle_gb: float) -> int | None:
    """Shards per shuffle group for ``--shuffle-gb`` (None: one group, every row permuted together).

    A setting of the data, not of the machine: a cache whose features (every view of every
    row in ``dtype``, what the fit in memory holds) fit ``shuffle_gb`` is one group; a
    larger one is cut into groups of as many of its largest shards as fit, at least one.
    """
    row = sum(r.row_bytes(int(cache.num_views), np.dtype(dtype).itemsize) for r in records.values())
    if len(cache) * row <= shuffle_gb * GB:
        return None
    largest = max((len(s) for s in cache.shards), default=1)
    return max(1, int(shuffle_gb * GB // (largest * row)))


@dataclass
class MemoryPlan:
    """What a fit holds, in bytes, and the policy, shuffle group and pass chosen for the budget."""

    policy: str
    group: int | None  # shards per shuffle group (None: all), from --shuffle-gb
    pass_rows: int | None  # streamed: rows of this process one read holds (None: a whole group)
    passes: int  # reads per epoch (streamed; 0 in memory)
    baseline: int  # what the process held when it planned (VmRSS)
    features: int  # every view of every row (memory) or two passes and one shard's read (streamed)
    batches: int  # float32 batches and their gathers
    model: int  # gradients, optimiser state and one batch's activations (twice: live, heap kept)
    other: int  # held-out rows, the epoch's index, first-use buffers (FIRST_USE), raw-cosine scoring
    budget: int
    need: int = 0  # the least this fit needs: one batch per pass

    @property
    def total(self) -> int:
        return self.baseline + self.features + self.batches + self.model + self.other

    def to_dict(self) -> dict:
        """summary.json's ``memory``: the policy, the group, the passes and the estimate in bytes."""
        return {"policy": self.policy, "shuffle_group_shards": self.group, "pass_rows": self.pass_rows,
                "passes_per_epoch": self.passes,
                "baseline_bytes": self.baseline, "features_bytes": self.features,
                "batches_bytes": self.batches, "model_bytes": self.model, "other_bytes": self.other,
                "estimate_bytes": self.total, "budget_bytes": self.budget}

    def describe(self) -> str:
        group = "every shard" if self.group is None else f"{self.group} shard(s)"
        how = self.policy if self.policy == "memory" else f"streamed in {self.passes} pass(es) per epoch"
        return (f"{how}, shuffle group {group}: process {self.baseline / GB:.3g} GB + features "
                f"{self.features / GB:.3g} GB + batches {self.batches / GB:.3g} GB + model {self.model / GB:.3g} GB "
                f"+ other {self.other / GB:.3g} GB of a {self.budget / GB:.3g} GB budget")

    def shortfall(self) -> str | None:
        """One line when the budget is below what the fit needs at all, else None."""
        if self.total <= self.budget:
            return None
        return (f"note: --memory-gb {self.budget / GB:.3g} is below what this fit needs with one batch per read: "
                f"{self.need / GB:.3g} GB (the process already holds {self.baseline / GB:.3g} GB); it runs holding "
                f"about {self.total / GB:.3g} GB")


def plan_features(cache, records: dict, dtype, batch_size: int, model_bytes: int, memory_gb: float | None,
                  group: int | None = None, heldout_rows: int = 0) -> MemoryPlan:
    """Choose in memory or streamed, and the rows of a streamed pass, for ``memory_gb`` (None:
    half the available memory); ``group``: shards per shuffle group (:func:`shuffle_group`).

    In memory when every view of every row fits with the rest; otherwise streamed with
    passes as large as two of them (one training, one being read) allow, at least one
    batch: the budget never refuses a fit, and never changes its batches.
    """
    itemsize = np.dtype(dtype).itemsize
    views, n = int(cache.num_views), len(cache)
    row = sum(r.row_bytes(1, itemsize) for r in records.values())  # one view of one row
    row32 = sum(r.row_bytes(1, 4) for r in records.values())
    stored = sum(r.row_bytes(1) for r in records.values())  # as the cache holds it
    batches = 3 * (batch_size + 1) * row32  # the float32 batch, its gather and the device copy
    budget = int((memory_gb if memory_gb is not None else available_gb() / 2) * GB)
    baseline = process_rss()
    width = sum(int(np.prod(r.shape)) for r in records.values())  # the raw-cosine baseline's input
    scoring = 3 * SCORED_TRIALS * width * 4  # its scoring block (score_trials: 3 float32 blocks)
    other = heldout_rows * row + INDEX_BYTES_PER_ROW * n + FIRST_USE + scoring
    fixed = baseline + batches + model_bytes + other
    whole = n * views * row
    if fixed + whole <= budget:
        return MemoryPlan("memory", group, None, 0, baseline, whole, batches, model_bytes, other, budget, fixed + whole)
    shards = [len(s) for s in cache.shards] or [1]
    largest = max(shards)
    read = 2 * largest * stored  # a shard's rows of one view as stored, and their copy (at most the view, twice)
    held = row + ROW_INDEX_BYTES
    groups = 1 if group is None else -(-len(shards) // group)
    per_group = -(-n // groups) // distributed.world() + 1  # this process's rows of a group (at most)
    pass_rows = max(batch_size, (budget - fixed - read) // (2 * held))
    need = fixed + read + 2 * batch_size * held
    if need > budget:
        pass_rows = max(pass_rows, SHORT_PASS_BYTES // held)
    if pass_rows >= per_group:
        pass_rows = None
    rows = per_group if pass_rows is None else pass_rows
    reads = -(-per_group // rows)
    return MemoryPlan("streamed", group, pass_rows, groups * reads, baseline, 2 * rows * held + read, batches,
                      model_bytes, other, budget, need)


def model_bytes(model, loss, batch_size: int, activations_per_row: int) -> int:
    """Gradients and two optimiser states of ``model`` and ``loss`` (float32; the parameters
    themselves are already held when the plan measures the process), and
    ``activations_per_row`` float32 values per row of a batch kept for the backward pass,
    counted twice: once live, once for the heap glibc keeps after the step frees them (its
    mmap threshold rises to the largest buffer freed, so later ones come from the heap and
    stay resident: measured, a frame-stream fit peaked 0.22 GB above a count of once, and
    under it with a fixed threshold, which costs a pooled fit 40% of its speed)."""
    params = sum(p.numel() for m in (model, loss) for p in m.parameters())
    return 4 * (3 * params + 2 * batch_size * activations_per_row)
