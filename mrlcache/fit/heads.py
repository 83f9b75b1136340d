"""Heads a fit can train, by name: ``HEADS[name](cfg, pooled_dim, num_classes) -> (head, loss)``.

A builder gets the fit's options (:class:`mrlcache.fit.config.FitConfig`) and the input
geometry, and returns the head (``(B, pooled_dim) -> (B, max_dim)``, with ``dims`` and
``pooled_dim`` attributes) and its loss (``loss(emb, labels, classes) -> (total, per-dim
losses, per-dim accuracies)``, with ``dims``, ``num_classes``, ``margin`` and
``set_margin``). Register a new head with :func:`register_head`.

Today: ``mrl``, the Matryoshka head of :mod:`mrlcache.models.matryoshka` with the loss of
:mod:`mrlcache.fit.losses`
(over a pooled vector), and ``ecapa``, ECAPA-TDNN over frames (:mod:`~mrlcache.models.ecapa`)
with the same loss. On cached streams other than ``pooled`` both sit at the end of a
:class:`~mrlcache.models.streams.StreamModel` (encoders, fusion, head), which builds
them from :data:`~mrlcache.models.streams.HEAD_MODULES` (class + what it reads, plain
constructor arguments for model.pt): a new head for streams goes there too.
"""

from __future__ import annotations

from typing import Callable

import torch

from mrlcache.fit.losses import MatryoshkaMarginLoss
from mrlcache.models.matryoshka import MatryoshkaHead

__all__ = ["HEADS", "build_head", "make_loss", "register_head"]

HEADS: dict[str, Callable] = {}


def register_head(name: str, builder: Callable) -> None:
    """Make ``builder(cfg, pooled_dim, num_classes) -> (head, loss)`` available as ``--head name``."""
    HEADS[name] = builder


def make_loss(cfg, num_classes: int):
    """The Matryoshka margin loss of the fit's options (every head trains with it)."""
    return MatryoshkaMarginLoss(cfg.dims, num_classes, dim_weights=cfg.dim_weights,
                                margin=cfg.margin if cfg.margins is None else cfg.margins,
                                scale=cfg.scale, subcenters=cfg.subcenters, classifier=cfg.classifier,
                                kind=cfg.loss, grad_scaling=cfg.grad_scaling)


def _mrl(cfg, pooled_dim: int, num_classes: int):
    head = MatryoshkaHead(pooled_dim, cfg.dims)
    return head, make_loss(cfg, num_classes)


def _ecapa(cfg, in_dim: int, num_classes: int):
    from mrlcache.models.ecapa import ECAPATDNN
    from mrlcache.models.streams import head_args

    return ECAPATDNN(**head_args(cfg, in_dim)), make_loss(cfg, num_classes)


register_head("mrl", _mrl)
register_head("ecapa", _ecapa)  # over frames (B, in_dim, T): fit on frame streams (--inputs layers, fbank...)


def build_head(cfg, pooled_dim: int, num_classes: int, device):
    """The head and loss of ``cfg.head`` on ``device``, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)  # the head's initial weights depend on the seed only
    head, loss = HEADS[cfg.head](cfg, pooled_dim, num_classes)
    return head.to(device), loss.to(device)
