"""Optimiser, parameter groups and learning-rate schedule of a fit."""

from __future__ import annotations

import math

import torch


def param_groups(modules, cfg, lr=None) -> list[dict]:
    """Two groups over ``modules``' parameters: matrices decayed, vectors (BN, biases) not."""
    # No weight decay on BatchNorm parameters and biases: decay there only shrinks the scale.
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            (no_decay if p.ndim < 2 else decay).append(p)
    lr = cfg.optim.lr if lr is None else lr
    return [{"params": decay, "weight_decay": cfg.optim.weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


def make_optimizer(cfg, groups):
    """AdamW or Nesterov SGD over ``groups``, fused."""
    # Fused kernels: one pass per parameter instead of ~8 elementwise ops (AdamW step +
    # clipping measured ~12 -> ~4 ms per step at the b2/5994-class geometry on 2 cores).
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True)
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                           nesterov=True, fused=True)


def make_scheduler(cfg, opt, steps_per_epoch: int):
    """Cosine (stepped per optimiser step, linear warm-up) or plateau (stepped on val EER)."""
    if cfg.optim.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2)
    warm = max(1, int(round(cfg.optim.warmup_epochs * steps_per_epoch)))
    total = max(warm + 1, cfg.optim.epochs * steps_per_epoch)

    def factor(step):  # linear warm-up, then cosine to zero over the remaining steps
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class MarginWarmup:
    """The loss's margin grows linearly from 0 to ``margin`` over ``epochs`` epochs.

    The loop only calls :meth:`step` at each epoch's start and records :attr:`value`; this
    object is what sets the margin on the loss (``loss.set_margin``), as a learning-rate
    schedule sets the optimiser's rate. ``epochs=0``: the full margin from the start.
    """

    def __init__(self, loss, margin: float, epochs: int):
        self.loss, self.margin, self.epochs = loss, float(margin), int(epochs)
        self.value = None

    def step(self, epoch: int) -> float:
        """Set the margin of ``epoch`` (0-based) on the loss; returns the margin the loss uses."""
        share = min(1.0, epoch / self.epochs) if self.epochs > 0 else 1.0
        self.loss.set_margin(self.margin * share)
        self.value = self.loss.margin  # 0 for a loss without a margin (softmax)
        return self.value
