"""Heads a fit can train, by name: ``HEADS[name](cfg, pooled_dim, num_classes) -> (head, loss)``.

A builder gets the fit's options (:class:`mrlcache.fit.config.FitConfig`) and the input
geometry, and returns the head (``(B, pooled_dim) -> (B, max_dim)``, with ``dims`` and
``pooled_dim`` attributes) and its loss (``loss(emb, labels, classes) -> (total, per-dim
losses, per-dim accuracies)``, with ``dims``, ``num_classes``, ``margin`` and
``set_margin``). Register a new head with :func:`register_head`.

Today: ``mrl``, the Matryoshka head and margin loss of :mod:`mrlcache.fit.heads.mrl`.
"""

from __future__ import annotations

from typing import Callable

import torch

from mrlcache.fit.heads.mrl import MatryoshkaHead, MatryoshkaMarginLoss, check_dims, sample_classes

__all__ = ["HEADS", "MatryoshkaHead", "MatryoshkaMarginLoss", "build_head", "check_dims", "register_head",
           "sample_classes"]

HEADS: dict[str, Callable] = {}


def register_head(name: str, builder: Callable) -> None:
    """Make ``builder(cfg, pooled_dim, num_classes) -> (head, loss)`` available as ``--head name``."""
    HEADS[name] = builder


def _mrl(cfg, pooled_dim: int, num_classes: int):
    head = MatryoshkaHead(pooled_dim, cfg.dims)
    loss = MatryoshkaMarginLoss(cfg.dims, num_classes, dim_weights=cfg.dim_weights,
                                margin=cfg.margin if cfg.margins is None else cfg.margins,
                                scale=cfg.scale, subcenters=cfg.subcenters, classifier=cfg.classifier,
                                kind=cfg.loss, grad_scaling=cfg.grad_scaling)
    return head, loss


register_head("mrl", _mrl)


def build_head(cfg, pooled_dim: int, num_classes: int, device):
    """The head and loss of ``cfg.head`` on ``device``, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)  # the head's initial weights depend on the seed only
    head, loss = HEADS[cfg.head](cfg, pooled_dim, num_classes)
    return head.to(device), loss.to(device)
