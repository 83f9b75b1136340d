"""Matryoshka projection head and margin-softmax losses over nested prefixes.

The head maps a pooled backbone vector to one embedding of the largest requested size;
every smaller requested size is a *prefix* of it (Matryoshka Representation Learning,
Kusupati et al., NeurIPS 2022). The loss is a weighted sum, over the prefix sizes, of a
margin softmax on the L2-normalised prefix:

- ``aam``: additive angular margin, logit of the true class ``s * cos(theta + m)``
  (ArcFace, Deng et al., CVPR 2019), with the usual fallback when ``theta + m`` passes pi;
- sub-centre AAM (Deng et al., ECCV 2020): ``K`` centres per class, the class cosine is
  the largest of its centres' cosines;
- ``softmax``: the same scaled cosine logits without a margin (a normalised softmax),
  the baseline.

Classifier weights are either one matrix ``(classes * K, max_dim)`` whose prefixes serve
every size (``shared``), or one matrix per size (``per-dim``).

Cost: the class scores dominate a head step. Each size normalises its (small) slices of
the embedding and of the weights and runs one matmul; the margin and cross-entropy then run
once on the stacked ``(S, B, classes)`` logits. Summing per-segment products cumulatively
would need 2.5x fewer FLOPs for 64/128/192/256, but then normalising the ``(S, B, classes)``
dot products takes several extra full passes over that tensor, and on the CPU those
memory-bound passes cost more than the saved FLOPs (measured: ~20% slower per step).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIERS = ("shared", "per-dim")
KINDS = ("aam", "softmax")


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

    def __init__(self, pooled_dim: int, dims: Sequence[int]):
        super().__init__()
        self.dims = check_dims(dims, pooled_dim)
        self.pooled_dim = int(pooled_dim)
        self.bn = nn.BatchNorm1d(self.pooled_dim)
        self.linear = nn.Linear(self.pooled_dim, self.dims[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, pooled_dim) -> (B, max_dim), raw (not normalised)."""
        return self.linear(self.bn(x))


class MatryoshkaMarginLoss(nn.Module):
    """Weighted sum over prefix sizes of a margin softmax on the normalised prefix.

    Args:
        dims: nested sizes, strictly increasing.
        num_classes: number of training speakers.
        dim_weights: importance of each size (default equal); normalised to sum 1 so the
            loss scale does not depend on how many sizes are trained.
        margin: angular margin in radians (``aam``; ignored by ``softmax``).
        scale: logit scale ``s``.
        subcenters: centres per class ``K``.
        classifier: ``shared`` (one weight, sliced per size) or ``per-dim``.
        kind: ``aam`` or ``softmax``.
        easy_margin: apply the margin only where cos(theta) > 0 (ArcFace's easy margin);
            otherwise the standard fallback ``cos(theta) - m sin(m)`` past the threshold.
    """

    def __init__(
        self,
        dims: Sequence[int],
        num_classes: int,
        *,
        dim_weights: Sequence[float] | None = None,
        margin: float = 0.2,
        scale: float = 32.0,
        subcenters: int = 1,
        classifier: str = "shared",
        kind: str = "aam",
        easy_margin: bool = False,
    ):
        super().__init__()
        self.dims = check_dims(dims)
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier {classifier!r}: choose one of {', '.join(CLASSIFIERS)}")
        if kind not in KINDS:
            raise ValueError(f"loss kind {kind!r}: choose one of {', '.join(KINDS)}")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a softmax needs at least 2 speakers")
        if subcenters < 1:
            raise ValueError(f"subcenters={subcenters}: must be >= 1")
        if dim_weights is None:
            dim_weights = [1.0] * len(self.dims)
        if len(dim_weights) != len(self.dims) or any(w < 0 for w in dim_weights) or sum(dim_weights) <= 0:
            raise ValueError(
                f"dim_weights {list(dim_weights)}: need {len(self.dims)} non-negative values, "
                f"one per dim in {list(self.dims)}, not all zero"
            )
        self.num_classes, self.subcenters = int(num_classes), int(subcenters)
        self.classifier, self.kind, self.scale = classifier, kind, float(scale)
        self.easy_margin = bool(easy_margin)
        w = torch.tensor([float(v) for v in dim_weights])
        self.register_buffer("dim_weights", w / w.sum())
        rows = self.num_classes * self.subcenters  # row c*K + k is centre k of class c
        if classifier == "shared":
            self.weight = nn.Parameter(torch.empty(rows, self.dims[-1]))
            nn.init.xavier_uniform_(self.weight)
        else:
            self.weights = nn.ParameterList(nn.Parameter(torch.empty(rows, d)) for d in self.dims)
            for p in self.weights:
                nn.init.xavier_uniform_(p)
        self.set_margin(margin)

    def set_margin(self, margin: float) -> None:
        """Set the angular margin (radians); the fit warms it up from 0 over the first epochs."""
        m = float(margin) if self.kind == "aam" else 0.0
        self.margin = m
        self._cos_m, self._sin_m = math.cos(m), math.sin(m)
        # Past theta = pi - m, cos(theta + m) would rise again; use a linear continuation.
        self._th = math.cos(math.pi - m)
        self._mm = math.sin(math.pi - m) * m

    def cosines(self, emb: torch.Tensor) -> torch.Tensor:
        """Class cosines of every prefix: (B, max_dim) -> (S, B, classes), float32.

        Sub-centres are reduced by max; no margin is applied.
        """
        emb = emb.float()
        if self.classifier == "shared":
            weights = [self.weight[:, :d] for d in self.dims]  # normalise each sliced prefix
        else:
            weights = list(self.weights)
        cos = torch.stack(
            [F.normalize(emb[:, :d], dim=1) @ F.normalize(w.float(), dim=1).T for d, w in zip(self.dims, weights)]
        )  # (S, B, C*K)
        if self.subcenters > 1:
            cos = cos.unflatten(-1, (self.num_classes, self.subcenters)).amax(-1)
        return cos

    def forward(self, emb: torch.Tensor, labels: torch.Tensor):
        """Loss of a batch.

        Args: emb (B, max_dim) head output; labels (B,) int64 class indices.
        Returns: (total loss (), per-dim losses (S,), per-dim accuracies (S,)); the
        accuracies are of the cosine argmax without margin and carry no gradient.
        """
        cos = self.cosines(emb)  # (S, B, C)
        S, B, C = cos.shape
        idx = labels.view(1, B, 1).expand(S, B, 1)
        target = cos.gather(2, idx)  # (S, B, 1)
        if self.kind == "aam" and self.margin > 0:
            sin = (1.0 - target.square()).clamp(0, 1).sqrt()
            phi = target * self._cos_m - sin * self._sin_m  # cos(theta + m)
            if self.easy_margin:
                phi = torch.where(target > 0, phi, target)
            else:
                phi = torch.where(target > self._th, phi, target - self._mm)
            # Scale, then overwrite the target logits in place: one pass over (S, B, C), not two.
            logits = cos * self.scale
            logits.scatter_(2, idx, phi * self.scale)
        else:
            logits = cos * self.scale
        per = F.cross_entropy(logits.reshape(S * B, C), idx.reshape(S * B), reduction="none")
        dim_losses = per.view(S, B).mean(1)  # (S,)
        total = (dim_losses * self.dim_weights).sum()
        with torch.no_grad():
            dim_acc = (cos.argmax(2) == labels.view(1, B)).float().mean(1)
        return total, dim_losses, dim_acc
