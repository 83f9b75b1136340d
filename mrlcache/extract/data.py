"""The decoding side of extract: manifest rows -> decoded views in DataLoader workers, the
batches of one shard, and the progress bar.

A worker decodes each utterance once and makes every view from that one decode
(:func:`mrlcache.augment.make_view`, a pure function of seed, utterance id and view index).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from mrlcache.audio import MIN_SAMPLES, SAMPLE_RATE, AudioError, check_wave, load_audio
from mrlcache.augment import Augmenter, make_view
from mrlcache.extract.config import ExtractConfig


@dataclass
class Item:
    """One decoded utterance: its views, or the reason it has none."""

    row: int
    utt_id: str
    views: np.ndarray | None  # (V, crop) train, (1, T) eval
    reason: str | None
    seconds: float


class UtteranceViews(torch.utils.data.Dataset):
    """Manifest row -> :class:`Item` (decoded once, every view made from that one decode)."""

    def __init__(self, utterances, cfg: ExtractConfig, minimum: tuple[int, str] = (MIN_SAMPLES, "the model")):
        self.utterances = utterances
        self.cfg = cfg
        self.minimum = minimum  # (samples, who): the shortest wave the encoder takes
        self.crop_samples = int(round(cfg.views.crop_seconds * SAMPLE_RATE))
        self.augmenter = Augmenter(cfg.views.augment) if cfg.views.mode == "train" and cfg.views.count > 1 else None

    def __len__(self):
        return len(self.utterances)

    def __getitem__(self, row: int) -> Item:
        utt = self.utterances[row]
        try:
            wave = load_audio(utt.path)  # (T,)
            check_wave(wave, utt.path, self.cfg.views.min_seconds, minimum=self.minimum)
        except AudioError as err:
            return Item(row, utt.utt_id, None, err.reason, 0.0)
        seconds = wave.shape[0] / SAMPLE_RATE
        if self.cfg.views.mode == "eval":
            if self.cfg.views.max_seconds:
                wave = wave[: int(round(self.cfg.views.max_seconds * SAMPLE_RATE))]
            return Item(row, utt.utt_id, wave[None], None, seconds)
        views = np.stack(
            [
                make_view(wave, utt.utt_id, v, seed=self.cfg.run.seed, crop_samples=self.crop_samples,
                          augmenter=self.augmenter)
                for v in range(self.cfg.views.count)
            ]
        )  # (V, crop)
        return Item(row, utt.utt_id, views, None, seconds)


def collate(items):
    return items


# Niceness of a decoding worker when the model runs on the CPU (0: the same as extract's).
# Its decoding is about 2% of the forward's CPU time, but a worker woken while the model's two
# threads hold both cores preempts one of them, and the other waits for it at the next barrier;
# at nice 19 it would run in the gaps the model leaves. Measured on 2 cores, quiet and busy
# (benchmarks/README.md, "where extraction's 10-17% goes"), nice 19 was not ahead (torch 0.80
# against 0.85 of the bare forward, fused 0.81 against 0.80, onnxruntime 1.00 against 0.95,
# rounds varying by 0.15), so the default stays 0; ``bench_extract.py --nices`` compares values.
WORKER_NICE = 0


def worker_init(_, parent: int | None = None, nice: int = 0):
    """A decoding worker: dies with its parent (``parent``: its pid), uses one thread, and
    lowers its priority by ``nice`` (0: unchanged; ignored where ``os.nice`` does not exist)."""
    from mrlcache.workers import die_with_parent

    if parent is not None:  # a killed extract must not leave its workers decoding for hours
        die_with_parent(parent)
    # Workers only decode and augment: one thread each, so they never fight the model.
    torch.set_num_threads(1)
    if nice and hasattr(os, "nice"):
        os.nice(nice)


def shard_batches(rows: range, utts_per_batch: int) -> list[list[int]]:
    """Split one shard's rows into batches; batches never cross a shard boundary."""
    return [list(rows[i : i + utts_per_batch]) for i in range(0, len(rows), utts_per_batch)]


class ExtractProgress:
    """Rich progress bar: utterances, audio hours, utterances/s, ETA (stderr)."""

    def __init__(self, total: int, rank: int, enabled: bool):
        self.enabled = enabled and total > 0
        self.hours = 0.0
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"[bold]extract[/] rank {rank}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("utts  {task.fields[hours]:.2f} h audio  {task.fields[rate]:.1f} utt/s"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            refresh_per_second=2,  # its thread shares the cores with the model (10/s cost ~0.5% of one)
        )
        self.task = self.progress.add_task("extract", total=total, hours=0.0, rate=0.0)
        self.started = time.perf_counter()

    def __enter__(self):
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()

    def note(self, line: str) -> None:
        """One line on stderr, above the bar (or alone when the bar is off)."""
        if self.enabled:
            self.progress.console.print(line, soft_wrap=True, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr)

    def update(self, n: int, seconds: float):
        if not self.enabled:
            return
        self.hours += seconds / 3600
        done = self.progress.tasks[0].completed + n
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=n, hours=self.hours, rate=rate)
