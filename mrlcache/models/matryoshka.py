"""The Matryoshka projection head: BatchNorm + one linear map to the largest nested size.

Every smaller requested size is a *prefix* of the output (Matryoshka Representation
Learning, Kusupati et al., NeurIPS 2022). The losses that train it are in
:mod:`mrlcache.fit.losses`.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn
import torch


def check_dims(dims: Sequence[int], pooled_dim: int | None = None) -> tuple[int, ...]:
    """Validate prefix sizes: positive, strictly increasing, at most ``pooled_dim``.

    Raises ValueError naming the problem.
    """
    dims = tuple(int(d) for d in dims)
    if not dims:
        raise ValueError("dims: give at least one embedding size, e.g. 64,128,192,256")
    if any(d <= 0 for d in dims):
        raise ValueError(f"dims {list(dims)}: sizes must be positive")
    if any(b <= a for a, b in zip(dims, dims[1:])):
        raise ValueError(f"dims {list(dims)}: sizes must be strictly increasing, e.g. 64,128,192,256")
    if pooled_dim is not None and dims[-1] > pooled_dim:
        raise ValueError(f"dims {list(dims)}: largest size {dims[-1]} exceeds the pooled size {pooled_dim}")
    return dims


class MatryoshkaHead(nn.Module):
    """BatchNorm over the pooled vector, then one linear map to the largest size.

    Args: pooled_dim: size of the backbone's pooled vector; dims: nested sizes.
    The first ``d`` outputs are the ``d``-dimensional embedding, for every ``d`` in dims.
    """

    reads = "vector"
    width_arg = "pooled_dim"

    def __init__(self, pooled_dim: int, dims: Sequence[int]):
        super().__init__()
        self.dims = check_dims(dims, pooled_dim)
        self.pooled_dim = int(pooled_dim)
        self.bn = nn.BatchNorm1d(self.pooled_dim)
        self.linear = nn.Linear(self.pooled_dim, self.dims[-1])

    @staticmethod
    def option_args(options) -> dict:
        """No options beside the width and dims."""
        return {}

    def args(self) -> dict:
        """What rebuilds this head: ``MatryoshkaHead(**args)``."""
        return {"pooled_dim": self.pooled_dim, "dims": list(self.dims)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, pooled_dim) -> (B, max_dim), raw (not normalised)."""
        return self.linear(self.bn(x))
