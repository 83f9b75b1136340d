"""Heads that start from the encoder's published embedding ``e = W x + b`` (issue 21).

- :class:`WarmHead` (``fit --init published``): one linear map of the standardised pooled
  vector; the fit starts it at ``[Q W; X] x + [Q b; c]``, ``Q`` orthogonal (PCA or LDA of the
  training embeddings), so at epoch 0 its first ``E`` outputs are the rotated published
  embedding (the same cosine scores at full size), then trains all of it.
- :class:`AdaptorHead` (``fit --objective adaptor*``): ``e`` stays fixed (buffers); the output
  is ``Q e + g(Q e)``, ``Q`` a trainable orthogonal matrix
  (``torch.nn.utils.parametrizations.orthogonal``) and ``g`` an optional residual MLP whose
  last layer starts at zero (``hidden`` 0: rotation only, and the full-size scores are the
  published ones whatever ``Q`` is).

How they are started and trained: :mod:`mrlcache.fit.adaptor`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mrlcache.models.matryoshka import check_dims
from mrlcache.streams import POOLED_ONLY


class WarmHead(nn.Module):
    """A linear map of the standardised pooled vector, started from the published embedding.

    Args: pooled_dim P; dims nested sizes (the largest may exceed the published size
    ``embed_dim``). ``shift``/``scale`` (P,) standardise the input (fixed buffers, so
    the optimiser steps weights in standardised units, as after the mrl head's BatchNorm).
    """

    reads = "vector"
    width_arg = "pooled_dim"

    def __init__(self, pooled_dim: int, dims: Sequence[int], embed_dim: int):
        super().__init__()
        self.dims = check_dims(dims, pooled_dim)
        self.pooled_dim, self.embed_dim = int(pooled_dim), int(embed_dim)
        self.inputs = POOLED_ONLY
        self.register_buffer("shift", torch.zeros(self.pooled_dim))
        self.register_buffer("scale", torch.ones(self.pooled_dim))
        self.linear = nn.Linear(self.pooled_dim, self.dims[-1])

    @staticmethod
    def option_args(options) -> dict:
        """None from a fit's options: ``embed_dim`` is the encoder's (mrlcache.fit.adaptor builds this head)."""
        return {}

    def args(self) -> dict:
        """What rebuilds this head: ``Class(**args)``."""
        return {"pooled_dim": self.pooled_dim, "dims": list(self.dims), "embed_dim": self.embed_dim}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P) -> (B, max_dim), raw."""
        return self.linear((x - self.shift) / self.scale)

    @torch.no_grad()
    def set_map(self, weight: np.ndarray, bias: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> None:
        """Make the head compute ``weight x + bias`` (weight (max_dim, P), bias (max_dim,), float64)
        through the standardisation ``z = (x - shift) / scale`` (shift, scale (P,))."""
        weight, bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        self.shift.copy_(torch.from_numpy(np.asarray(shift, np.float64)))
        self.scale.copy_(torch.from_numpy(np.asarray(scale, np.float64)))
        self.linear.weight.copy_(torch.from_numpy(weight * scale))
        self.linear.bias.copy_(torch.from_numpy(bias + weight @ shift))  # w' z + b' = w x + b


class AdaptorHead(nn.Module):
    """A learned orthogonal rotation (+ optional residual MLP) of the fixed published embedding.

    Args: pooled_dim P; dims nested sizes (at most the published size ``embed_dim`` E);
    hidden: width of the residual MLP (0: rotation only). Buffers ``base_weight`` (E, P)
    and ``base_bias`` (E,) hold the published map (the identity for imported vectors).
    Output (B, E): the whole adapted embedding (wider than ``dims[-1]`` when the dims stop
    below E); its prefixes are the nested embeddings.
    """

    reads = "vector"
    width_arg = "pooled_dim"

    def __init__(self, pooled_dim: int, dims: Sequence[int], embed_dim: int, hidden: int = 0):
        super().__init__()
        self.dims = check_dims(dims, embed_dim)
        self.pooled_dim, self.embed_dim, self.hidden = int(pooled_dim), int(embed_dim), int(hidden)
        self.inputs = POOLED_ONLY
        self.register_buffer("base_weight", torch.zeros(self.embed_dim, self.pooled_dim))
        self.register_buffer("base_bias", torch.zeros(self.embed_dim))
        self.rotation = nn.utils.parametrizations.orthogonal(nn.Linear(self.embed_dim, self.embed_dim, bias=False))
        self.mlp = None
        if self.hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(self.embed_dim, self.hidden), nn.GELU(),
                                     nn.Linear(self.hidden, self.embed_dim))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    @staticmethod
    def option_args(options) -> dict:
        """None from a fit's options: ``embed_dim`` is the encoder's (mrlcache.fit.adaptor builds this head)."""
        return {}

    def args(self) -> dict:
        """What rebuilds this head: ``Class(**args)``."""
        return {"pooled_dim": self.pooled_dim, "dims": list(self.dims), "embed_dim": self.embed_dim,
                "hidden": self.hidden}

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P) -> the published embedding (B, E)."""
        return F.linear(x, self.base_weight, self.base_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P) -> (B, E), raw."""
        r = self.rotation(self.base(x))
        return r if self.mlp is None else r + self.mlp(r)

    @torch.no_grad()
    def set_map(self, weight: np.ndarray, bias: np.ndarray, rotation: np.ndarray) -> None:
        """Set the published map (E, P), (E,) and the starting rotation (E, E)."""
        self.base_weight.copy_(torch.from_numpy(np.asarray(weight)))
        self.base_bias.copy_(torch.from_numpy(np.asarray(bias)))
        self.rotation.weight = torch.from_numpy(np.asarray(rotation, np.float32))  # the parametrisation's inverse


