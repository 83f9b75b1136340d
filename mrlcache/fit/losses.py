"""Margin-softmax losses over nested prefixes, for every head of :mod:`mrlcache.models`.

A head maps its input to one embedding of the largest requested size; every smaller
requested size is a *prefix* of it (Matryoshka Representation Learning, Kusupati et al.,
NeurIPS 2022; :mod:`mrlcache.models.matryoshka`). The loss is a weighted sum, over the prefix sizes, of a
margin softmax on the L2-normalised prefix:

- ``aam``: additive angular margin, logit of the true class ``s * cos(theta + m)``
  (ArcFace, Deng et al., CVPR 2019), with the usual fallback when ``theta + m`` passes pi;
- sub-centre AAM (Deng et al., ECCV 2020): ``K`` centres per class, the class cosine is
  the largest of its centres' cosines;
- ``softmax``: the same scaled cosine logits without a margin (a normalised softmax),
  the baseline.

Two options for the nested sizes, after Park and Kim (IEEE Access 13, 2025), who report
that plain MRL can degrade some sizes of a speaker embedding:

- per-size margins (``margin`` a sequence, one per size, e.g. 0.1, 0.15, 0.2, 0.2): a
  small prefix holds less, so a smaller margin asks less of it;
- element-wise gradient scaling (``grad_scaling``): coordinate ``j`` of the projection
  output is in every prefix longer than ``j``, so it collects the gradient of
  ``n_j = #{d in dims : d > j}`` losses and the last segment's coordinates only one; the
  gradient reaching coordinate ``j`` is multiplied by ``1 / n_j`` so every coordinate
  gets one loss's worth (:class:`~mrlcache.fit.fused.ScaleGrad`). The paper's own
  normalisation was not at hand: this rule is ours, stated here; it counts sizes and
  ignores ``dim_weights``.

Classifier weights are either one matrix ``(classes * K, max_dim)`` whose prefixes serve
every size (``shared``), or one matrix per size (``per-dim``).

The softmax may run over a sample of the classes at each step (Partial FC, An et al.,
ICCVW 2021, arXiv:2010.05222): the batch's own classes plus others drawn uniformly
(:func:`sample_classes`). The class scores are most of a step's cost, so a step over half
the classes takes about half the time; classes left out get no gradient at that step.

The fused autograd kernels that keep a step near its matmul cost are in
:mod:`mrlcache.fit.fused`; tests/fit/test_head.py checks them against a plain loop.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mrlcache.fit.fused import MarginCrossEntropy, PrefixScores, ScaleGrad, Scratch
from mrlcache.models.matryoshka import check_dims
from mrlcache.names import CLASSIFIERS  # shared, per-dim
from mrlcache.names import LOSSES as KINDS  # aam, softmax


def sample_classes(labels: torch.Tensor, num_classes: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Classes for one step of a sampled softmax (Partial FC, An et al., ICCVW 2021).

    Every class of ``labels`` is kept (its positive centre); the other classes are drawn
    uniformly without replacement until ``round(rate * num_classes)`` are kept (never fewer
    than the batch's own classes, never fewer than 2). Returns the kept class indices,
    sorted (C',) int64 on the CPU; ``generator`` makes the draw reproducible.
    """
    want = max(2, int(round(rate * num_classes)))
    pos = torch.unique(labels.cpu())  # sorted
    if len(pos) >= want:
        return pos
    is_pos = torch.zeros(num_classes, dtype=torch.bool)
    is_pos[pos] = True
    perm = torch.randperm(num_classes, generator=generator)
    others = perm[~is_pos[perm]][: want - len(pos)]
    return torch.cat([pos, others]).sort().values


def coordinate_counts(dims: Sequence[int]) -> torch.Tensor:
    """(max_dim,) float32: how many of the nested sizes ``dims`` hold each coordinate."""
    dims = torch.tensor(check_dims(dims))
    return (torch.arange(int(dims[-1]))[:, None] < dims[None, :]).sum(1).float()


class MatryoshkaMarginLoss(nn.Module):
    """Weighted sum over prefix sizes of a margin softmax on the normalised prefix.

    Args:
        dims: nested sizes, strictly increasing.
        num_classes: number of training speakers.
        dim_weights: importance of each size (default equal); normalised to sum 1 so the
            loss scale does not depend on how many sizes are trained.
        margin: angular margin in radians (``aam``; ignored by ``softmax``), one for every
            size, or a sequence of one per size (:meth:`set_margin` then scales them all).
        scale: logit scale ``s``.
        subcenters: centres per class ``K``.
        classifier: ``shared`` (one weight, sliced per size) or ``per-dim``.
        kind: ``aam`` or ``softmax``.
        easy_margin: apply the margin only where cos(theta) > 0 (ArcFace's easy margin);
            otherwise the standard fallback ``cos(theta) - m sin(m)`` past the threshold.
        grad_scaling: scale the gradient of each embedding coordinate by the inverse of
            the number of sizes that hold it (module docstring).
    """

    def __init__(
        self,
        dims: Sequence[int],
        num_classes: int,
        *,
        dim_weights: Sequence[float] | None = None,
        margin: float | Sequence[float] = 0.2,
        scale: float = 32.0,
        subcenters: int = 1,
        classifier: str = "shared",
        kind: str = "aam",
        easy_margin: bool = False,
        grad_scaling: bool = False,
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
        # Per-size margins: kept as ratios to the largest, which set_margin sets.
        self._margin_ratios = None
        if isinstance(margin, Sequence):
            margins = [float(m) for m in margin]
            if len(margins) != len(self.dims) or any(not m >= 0 for m in margins):
                raise ValueError(f"margins {margins}: need {len(self.dims)} values >= 0 (radians), "
                                 f"one per dim in {list(self.dims)}")
            top = max(margins)
            self._margin_ratios = [m / top if top > 0 else 0.0 for m in margins]
            margin = top
        self.grad_scaling = bool(grad_scaling)
        # Not persistent: a function of dims, so checkpoints keep their keys.
        self.register_buffer("grad_factor", 1.0 / coordinate_counts(self.dims), persistent=False)
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
        self._scratch = Scratch()  # reused score-sized buffers (not state)

    def set_margin(self, margin: float) -> None:
        """Set the angular margin (radians); the fit warms it up from 0 over the first epochs.

        With per-size margins, ``margin`` is the largest one and the others keep their
        ratio to it, so they warm up together.
        """
        m = float(margin) if self.kind == "aam" else 0.0
        self.margin = m
        if self._margin_ratios is None:
            self.margins = (m,) * len(self.dims)
            # Past theta = pi - m, cos(theta + m) would rise again; use a linear continuation.
            self._terms = (math.cos(m), math.sin(m), math.cos(math.pi - m), math.sin(math.pi - m) * m)
            return
        self.margins = tuple(m * r for r in self._margin_ratios)
        ms = torch.tensor(self.margins, dtype=torch.float64)[:, None]  # (S, 1): a row per size
        self._terms = tuple(t.float() for t in (ms.cos(), ms.sin(), torch.cos(math.pi - ms),
                                                  torch.sin(math.pi - ms) * ms))

    def scores(self, emb: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled class cosines of every prefix, no margin: (B, max_dim) -> (S, B, C) float32.

        ``classes`` (C,) restricts the columns to those classes, in that order (all when
        None). Sub-centres are reduced by max.
        """
        weights = [self.weight] if self.classifier == "shared" else list(self.weights)
        if classes is not None:  # rows c*K .. c*K+K-1 of each kept class c
            K = self.subcenters
            rows = (classes[:, None] * K + torch.arange(K, device=classes.device)).flatten()
            weights = [w.index_select(0, rows) for w in weights]
        if self.classifier == "shared":
            sc = PrefixScores.apply(emb, weights[0], self.dims, self.scale, self._scratch)
        else:  # one weight per size: a matmul per size on normalised inputs
            sc = torch.stack([(F.normalize(emb[:, :d].float(), dim=1) * self.scale)
                              @ F.normalize(w.float(), dim=1).T for d, w in zip(self.dims, weights)])
            sc = sc.float()
        if self.subcenters > 1:
            sc = sc.unflatten(-1, (-1, self.subcenters)).amax(-1)
        return sc

    def margin_logit(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logit and its slope: cos (S, B) -> (s * phi(cos), d phi / d cos), both (S, B).

        ``phi = cos(theta + m)``, past ``theta = pi - m`` the linear fallback (or, with the
        easy margin, no margin where cos <= 0); ``phi = cos`` without a margin.
        """
        if not (self.kind == "aam" and self.margin > 0):
            return self.scale * cos, torch.ones_like(cos)
        # Margin terms: floats, or (S, 1) tensors with per-size margins.
        cos_m, sin_m, th, mm = (t if isinstance(t, float) else t.to(cos.device) for t in self._terms)
        sin = (1.0 - cos.square()).clamp(0, 1).sqrt()
        phi = cos * cos_m - sin * sin_m  # cos(theta + m)
        # d cos(theta + m) / d cos(theta) = cos m + sin m cos(theta) / sin(theta); at
        # |cos| = 1 (sin = 0) the limit is infinite: use cos m there, as autograd through
        # the clamp above would.
        slope = torch.where(sin > 1e-6, cos_m + sin_m * cos / sin.clamp_min(1e-6),
                            torch.as_tensor(cos_m, dtype=cos.dtype, device=cos.device).expand_as(cos))
        keep = cos > 0 if self.easy_margin else cos > th
        fallback = cos if self.easy_margin else cos - mm
        return self.scale * torch.where(keep, phi, fallback), torch.where(keep, slope, torch.ones_like(cos))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor | None = None):
        """Loss of a batch.

        Args: emb (B, max_dim) head output; labels (B,) int64 class indices; classes
            (C',) sorted class indices that include every label (from
            :func:`sample_classes`): the softmax runs over those classes only; None: all.
        Returns: (total loss (), per-dim losses (S,), per-dim accuracies (S,)); the
        accuracies are of the cosine argmax without margin (over ``classes``) and carry
        no gradient.
        """
        if classes is not None:
            pos = torch.searchsorted(classes, labels)  # labels as positions in ``classes``
            if not torch.equal(classes[pos.clamp_max(len(classes) - 1)], labels):
                raise ValueError("classes must be sorted and include every label of the batch")
            labels = pos
        if self.grad_scaling and emb.requires_grad:
            emb = ScaleGrad.apply(emb, self.grad_factor)
        sc = self.scores(emb, classes)  # (S, B, C), scale * cos
        S, B = sc.shape[:2]
        with torch.no_grad():
            # The margin touches only the B target entries per size: gather, transform,
            # and let the cross-entropy put them back (with their slope for the gradient).
            own = sc.gather(2, labels.view(1, B, 1).expand(S, B, 1)).squeeze(2)  # (S, B)
            target_logit, slope = self.margin_logit((own / self.scale).clamp(-1, 1))
            top = sc.amax(2)  # (S, B)
            # Correct when the true class scores highest: argmax up to ties, at the cost
            # of the max pass (an argmax pass is ~10x slower here).
            dim_acc = (own >= top).float().mean(1)
            # |logits| <= scale: below 40, exp stays in float32's normal range unshifted.
            shift = torch.maximum(top, target_logit) if self.scale > 40 else None
        per = MarginCrossEntropy.apply(sc, labels, target_logit, slope, shift, self._scratch)  # (S, B)
        dim_losses = per.mean(1)  # (S,)
        total = (dim_losses * self.dim_weights).sum()
        return total, dim_losses, dim_acc
