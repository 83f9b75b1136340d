"""Eval mode's batches: whole utterances of one shard grouped by exact sample count.

Whole utterances differ in length, so eval mode ran one per forward: nothing is padded,
because padding would change every per-utterance statistic (the log-mel mean, attentive
pooling's global context, ECAPA's sentence mean). But real corpora hold many equal lengths
(VoxCeleb2's AAC decodes to whole 1024-sample frames; segment lists cut fixed lengths), and
utterances of exactly equal length batch without padding: each row of a batch is computed
as it would be alone, up to float rounding (a convolution may choose another algorithm for
another batch size: within ~1e-6 relative, see docs/performance.md).

:class:`EvalBuckets` takes a shard's decoded items in row order and gives back the batches
to run: a bucket (one shard, one length) is run once it holds ``--batch-size`` items or as
much audio as one window (``--window-seconds``, the memory one forward is promised: so an
utterance computed window by window always runs alone), when its shard's last item has
arrived, or, oldest first, when the buckets of a shard hold more than ``HOLD_SECONDS`` of
audio (memory: decoded waves wait here for partners). Which items share a batch depends only
on the shard's rows and the settings, never on timing, ranks or an earlier crash: a shard's
bytes are those of one uninterrupted run. Extract puts the results back in row order.
"""

from __future__ import annotations

from mrlcache.audio import SAMPLE_RATE
from mrlcache.ranges import DEFAULT_WINDOW_SECONDS

HOLD_SECONDS = 3600.0  # audio held waiting for equal lengths: 230 MB of float32 waves


class EvalBuckets:
    """Decoded eval items of one shard at a time -> batches of equal sample counts.

    Args:
        batch_size: most items in one batch (1: every item alone, as ``--eval-batch single``).
        window_seconds: eval's window (None: one pass, bounded here by the default window):
            a batch holds at most this much audio, a longer item alone.
        hold_seconds: most audio held in unfinished buckets before the oldest is run.
    """

    def __init__(self, batch_size: int, window_seconds: float | None, hold_seconds: float = HOLD_SECONDS):
        self.batch_size = batch_size
        self.batch_samples = int(round((window_seconds or DEFAULT_WINDOW_SECONDS) * SAMPLE_RATE))
        self.hold_samples = int(round(hold_seconds * SAMPLE_RATE))
        self.open: dict[tuple[int, int], list] = {}  # (shard, samples) -> items, in order of first arrival
        self.held = 0  # samples in self.open

    def capacity(self, samples: int) -> int:
        """Items of ``samples`` samples one batch may hold (at least 1)."""
        return max(1, min(self.batch_size, self.batch_samples // max(samples, 1)))

    def add(self, shard: int, items) -> list[list]:
        """Take decoded items (with views) of ``shard``; returns the batches now complete."""
        ready = []
        for item in items:
            samples = item.views.shape[-1]
            key = (shard, samples)
            bucket = self.open.setdefault(key, [])
            bucket.append(item)
            self.held += samples
            if len(bucket) >= self.capacity(samples):
                ready.append(self._pop(key))
        while self.held > self.hold_samples and self.open:
            ready.append(self._pop(next(iter(self.open))))  # the oldest bucket, partly filled
        return ready

    def finish(self, shard: int) -> list[list]:
        """Every remaining bucket of ``shard`` (its last item has arrived), oldest first."""
        return [self._pop(key) for key in [key for key in self.open if key[0] == shard]]

    def _pop(self, key) -> list:
        bucket = self.open.pop(key)
        self.held -= key[1] * len(bucket)
        return bucket
