"""Whole utterances longer than a window: one backbone pass per window, statistics combined.

A ReDimNet forward over a whole utterance holds activations for every frame (about 5 MB
per second of audio for b0, more for larger variants) and its attention costs time
quadratic in the length, so one 20-minute file took 5.5 GB and 15 minutes. Computing it in
chunks cannot give the same vector: the log-mel mean, every attention block, the
frequency-wise SE gates (b3-b5) and ASTP's softmax and global context all see the whole
utterance. So an utterance longer than ``window_seconds`` is cut into
``k = ceil(T / window)`` windows of nearly equal length (whole hops, lengths differing by
at most one hop; the last takes the remainder), and each window is one ordinary forward:
memory and time per window are those of a ``window_seconds`` utterance.

How the windows are combined, for each stream of a ReDimNet (or an ECAPA-TDNN, whose
frames are centred on the same 10 ms grid):

- ``pooled`` (ASTP's [mean, std]): the statistics of all the windows' frames, each window
  weighted by its number of frames n_i (N in all):
  ``mean = sum(n_i mean_i) / N``, ``std^2 = sum(n_i (std_i^2 + mean_i^2)) / N - mean^2``.
  This is ASTP over the whole utterance with each window's attention weights scaled by
  n_i / N; within a window nothing changes.
- ``layers`` frames: the windows' frames concatenated. Each window but the last drops its
  final frame, which is centred on the next window's first sample (the next window's
  frame 0), so there are ``T // hop + 1`` frames, as for one pass.
- ``layers`` pooled (``--layers-pooled``): mean and std over those concatenated frames,
  combined window by window as above (exact: the statistics are unweighted).

An utterance no longer than the window (every VoxCeleb1 file: 4 to 145 s, Nagrani et al.,
"VoxCeleb: a large-scale speaker identification dataset", Interspeech 2017) is one pass,
bit for bit what ``model.pooled`` gives. ``window_seconds=None`` makes every utterance one
pass. A PTM's and CAM++'s layers (frames not centred on a hop grid) and the handcrafted
streams are always computed in one pass.
"""

from __future__ import annotations

import torch

from mrlcache.audio import SAMPLE_RATE
from mrlcache.streams.layers import mean_std, stack

from mrlcache.ranges import DEFAULT_WINDOW_SECONDS as WINDOW_SECONDS  # 300: a 2-hour file is 24 passes
from mrlcache.ranges import WINDOW_SECONDS as _WINDOW_RANGE

MIN_WINDOW_SECONDS = _WINDOW_RANGE.lo


def num_windows(num_samples: int, window_seconds: float | None) -> int:
    """How many windows cover ``num_samples``: 1 when it fits (or no window), else ``ceil(T / window)``."""
    if window_seconds is None:
        return 1
    return max(1, -(-num_samples // int(round(window_seconds * SAMPLE_RATE))))


def window_bounds(num_samples: int, window_seconds: float | None, hop: int) -> list[tuple[int, int]]:
    """[(start, end), ...] sample ranges of the windows covering ``num_samples``.

    One range when the utterance fits (or ``window_seconds`` is None). Otherwise
    ``ceil(T / window)`` ranges of whole hops (the first ``units % k`` one hop longer),
    the last ending at ``num_samples``; each is at most one hop longer than the window.
    """
    k = num_windows(num_samples, window_seconds)
    if k == 1:
        return [(0, num_samples)]
    base, extra = divmod(num_samples // hop, k)
    bounds, start = [], 0
    for i in range(k):
        end = num_samples if i == k - 1 else start + (base + (i < extra)) * hop
        bounds.append((start, end))
        start = end
    return bounds


def combine_stats(stats: list[torch.Tensor], counts: list[int], floor: float = 1e-7) -> torch.Tensor:
    """[mean, std] vectors of several windows (each (B, 2D)) -> those of their union (B, 2D).

    ``counts`` are the windows' frame numbers (their weights). Computed in float64 (the
    second moment minus the squared mean cancels badly in float32); the variance is
    floored at ``floor`` (ASTP's 1e-7; 0 for plain statistics).
    """
    x = torch.stack([s.double() for s in stats])  # (k, B, 2D)
    w = torch.tensor(counts, dtype=torch.float64, device=x.device).div_(sum(counts)).view(-1, 1, 1)
    mean, std = x.chunk(2, dim=-1)
    mu = (w * mean).sum(0)
    second = (w * (std.square() + mean.square())).sum(0)
    out = torch.cat([mu, (second - mu.square()).clamp_min(floor).sqrt()], dim=-1)
    return out.to(stats[0].dtype)


def _hop(model) -> int:
    return int(model.model_config["hop_length"])


def _frames(bounds, hop: int) -> list[int]:
    """Frames each window's forward pools over (T // hop + 1 each)."""
    return [(b - a) // hop + 1 for a, b in bounds]


def pooled(model, waves: torch.Tensor, window_seconds: float | None) -> torch.Tensor:
    """ASTP vectors (B, pooled_dim) of whole utterances (B, T), window by window."""
    hop = _hop(model)
    bounds = window_bounds(waves.shape[-1], window_seconds, hop)
    if len(bounds) == 1:
        return model.pooled(waves)
    parts = [model.pooled(waves[..., a:b]) for a, b in bounds]
    return combine_stats(parts, _frames(bounds, hop))


def layers(model, waves: torch.Tensor, window_seconds: float | None, *, stats: bool,
           with_pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``layers`` stream of a backbone over whole utterances, window by window.

    A backbone whose layer frames are not centred on a hop grid (``layer_hop`` None: CAM++,
    a PTM) takes one pass; the ``pooled`` it gives then comes from the same pass only when
    the utterance fits one window (else from :func:`pooled`, as without layers).

    Returns:
        (frames (B, L, D, frames), or [mean, std] per layer (B, L, 2D) when ``stats``) and,
        with ``with_pooled``, the ``pooled`` stream from the same passes.
    """
    hop = model.layer_hop
    if hop is None:
        outs = model.layer_outputs(waves)
        frames = stack(outs)
        pooled_value = None
        if with_pooled:
            one = num_windows(waves.shape[-1], window_seconds) == 1
            pooled_value = model.pooled_from_layers(outs) if one else pooled(model, waves, window_seconds)
        return (mean_std(frames) if stats else frames), pooled_value
    bounds = window_bounds(waves.shape[-1], window_seconds, hop)
    kept, summaries, pools, counts = [], [], [], []
    for i, (a, b) in enumerate(bounds):
        outs = model.layer_outputs(waves[..., a:b])
        if with_pooled:
            pools.append(model.pooled_from_layers(outs))
        frames = stack(outs)  # (B, L, D, t)
        if i < len(bounds) - 1:
            frames = frames[..., :-1]  # the next window's frame 0 is this frame
        counts.append(frames.shape[-1])
        if stats:
            summaries.append(mean_std(frames))  # (B, L, 2D); the frames are dropped here
        else:
            kept.append(frames)
    pooled_value = None
    if with_pooled:
        pooled_value = pools[0] if len(pools) == 1 else combine_stats(pools, _frames(bounds, hop))
    if not stats:
        return (kept[0] if len(kept) == 1 else torch.cat(kept, dim=-1)), pooled_value
    if len(summaries) == 1:
        return summaries[0], pooled_value
    b, num = summaries[0].shape[:2]
    flat = [s.reshape(b * num, -1) for s in summaries]  # each layer's [mean, std] combined alike
    return combine_stats(flat, counts, floor=0.0).reshape(b, num, -1), pooled_value
