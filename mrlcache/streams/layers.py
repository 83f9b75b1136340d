"""The ``layers`` stream: a backbone's block outputs per frame, stacked, or their statistics.

Every backbone gives its block outputs through one interface (``layer_outputs``,
``pooled_from_layers``, ``layer_dims``, the frame grid; see
:mod:`mrlcache.backbone.registry`), computed by running the model's own submodules in the
order its forward does, so the model code needs no hooks and ``pooled_from_layers``
finishes the forward exactly (tests check both against the one-pass ``pooled``):

- ReDimNet: the stem's and every stage's 1D output (B, F*C, T // hop + 1), the tensors
  every stage and the final aggregation read through learned softmax-weighted sums;
- ECAPA-TDNN: the TDNN layer's and the three SE-Res2Net blocks' outputs (B, C, T // 160 + 1);
  its multi-layer aggregation concatenates blocks 1-3;
- CAM++: the outputs of its last two transitions (B, 512, ceil(Kaldi frames / 2)), 50 a second;
- a PTM: its 13 hidden states (:mod:`mrlcache.streams.ptm`).

The stream stores them stacked (B, L, D, T), or with ``layers_pooled`` their mean and std
over time per layer (B, L, 2D). :class:`Layers` and :class:`Pooled` are the ``layers`` and
``pooled`` streams as modules over a backbone's exportable form (``backbone.exportable()``),
for :mod:`mrlcache.export`.
"""

from __future__ import annotations

import torch
from torch import nn


def stack(outs: list[torch.Tensor]) -> torch.Tensor:
    """L tensors (B, D, T) -> (B, L, D, T)."""
    return torch.stack(outs, dim=1)


def mean_std(frames: torch.Tensor) -> torch.Tensor:
    """Per-layer statistics over time: (B, L, D, T) -> (B, L, 2D) = [mean, std] (float32)."""
    x = frames.float()
    mean = x.mean(dim=-1)
    std = x.var(dim=-1, unbiased=False).clamp_min(0.0).sqrt()
    return torch.cat([mean, std], dim=-1)


class Layers(nn.Module):
    """Wave (B, T) -> the ``layers`` stream (B, L, D, T') or, ``pooled``, (B, L, 2D), from ``net``
    (a backbone's ``exportable()``: ``layer_outputs`` and ``min_samples``)."""

    def __init__(self, net: nn.Module, pooled: bool = False):
        super().__init__()
        self.net, self.pooled = net, pooled
        self.min_samples = int(net.min_samples)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        frames = stack(self.net.layer_outputs(wave))
        return mean_std(frames) if self.pooled else frames


class Pooled(nn.Module):
    """Wave (B, T) -> the ``pooled`` stream (B, pooled_dim), from a backbone's ``exportable()``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.min_samples = int(net.min_samples)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.net.pooled(wave)
