"""A head and its loss from the fit's options: the head class from :data:`mrlcache.models.HEADS`.

:func:`build_head` makes the head a fit trains directly on a vector (``--inputs pooled``)
and :func:`make_loss` the Matryoshka margin loss every head trains with
(:mod:`mrlcache.fit.losses`). A head on other cached streams sits inside a
:class:`~mrlcache.models.streams.StreamModel` (:mod:`mrlcache.fit.stream_mode`). A new head
is a file in ``mrlcache/models/`` and one line in ``mrlcache.models.HEADS``; nothing here
names a head.
"""

from __future__ import annotations

import torch

from mrlcache.fit.losses import MatryoshkaMarginLoss
from mrlcache.models import head_args, head_class

__all__ = ["build_head", "make_loss"]


def make_loss(cfg, num_classes: int):
    """The Matryoshka margin loss of the fit's options (every head trains with it)."""
    return MatryoshkaMarginLoss(cfg.head.dims, num_classes, dim_weights=cfg.loss.dim_weights,
                                margin=cfg.loss.margin if cfg.loss.margins is None else cfg.loss.margins,
                                scale=cfg.loss.scale, subcenters=cfg.loss.subcenters, classifier=cfg.loss.classifier,
                                kind=cfg.loss.name, grad_scaling=cfg.loss.grad_scaling)


def build_head(cfg, width: int, num_classes: int, device):
    """The head ``cfg.head.name`` over vectors of ``width`` and its loss, on ``device``, initialised
    from ``cfg.run.seed``: (head, loss)."""
    torch.manual_seed(cfg.run.seed)  # the head's initial weights depend on the seed only
    head = head_class(cfg.head.name)(**head_args(cfg.head.name, width, cfg.head.dims, cfg.head))
    return head.to(device), make_loss(cfg, num_classes).to(device)
