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

The softmax may run over a sample of the classes at each step (Partial FC, An et al.,
ICCVW 2021, arXiv:2010.05222): the batch's own classes plus others drawn uniformly
(:func:`sample_classes`). The class scores are most of a step's cost, so a step over half
the classes takes about half the time; classes left out get no gradient at that step.

Cost: the class scores dominate a head step (batch 256, 5994 classes, 4 sizes: ~6M
logits). These choices keep a step near its matmul cost (2-core CPU, b2 geometry:
110-120 ms per step before, 41-48 ms after; see benchmarks/README.md):

- the margin touches only the ``B`` target logits per size: they are gathered from the
  score matrix, given ``cos(theta + m)`` through cos/sin identities (no ``acos``) with
  its slope, and put back inside the cross-entropy; nothing margin-related runs over
  the full logits;
- cross-entropy is one pass per direction (:class:`_MarginCrossEntropy`): ``exp`` into
  one buffer and a row sum forward, the softmax gradient written into the same buffer
  backward; no log-softmax, one-hot or gather/scatter tensors of that size;
- with the shared classifier, prefix dot products are built segment by segment
  (:class:`_PrefixScores`): one ``(B, 64) x (64, C)`` matmul per segment, accumulated
  over segments, with prefix norms from cumulative sums of squared segment norms: 2.5x
  fewer FLOPs than one matmul per prefix for 64/128/192/256, and the scaling rides on
  the accumulation so it costs one extra pass over the scores each way;
- the two score-sized buffers are reused from step to step (:class:`_Scratch`): fresh
  25 MB tensors are paged in anew on every step, which cost more than the arithmetic.
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


EPS = 1e-12  # as F.normalize: vectors shorter than this are not scaled up


def _matmul_dtype(device_type: str) -> torch.dtype:
    """bf16/fp16 when autocast is on (``--precision bf16`` on the CPU, AMP on CUDA), else float32."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


def _rev_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sum from the last row backwards along dim 0: out[k] = sum_{s >= k} x[s]."""
    return x.flip(0).cumsum(0).flip(0)


class _Scratch:
    """Free list of the large score-sized buffers, reused from step to step.

    Fresh score-sized tensors are paged in again on every step (measured here: ~50 MB of
    page faults per step, tens of ms); a buffer returns to the list only when the backward
    that last reads it is done, so a forward without a backward just allocates anew.
    """

    def __init__(self, keep: int = 2):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.keep = keep

    def take(self, shape, like: torch.Tensor) -> torch.Tensor:
        stack = self.free.get((tuple(shape), like.dtype, like.device))
        return stack.pop() if stack else like.new_empty(shape)

    def give(self, t: torch.Tensor) -> None:
        stack = self.free.setdefault((tuple(t.shape), t.dtype, t.device), [])
        if len(stack) < self.keep:
            stack.append(t)


class _PrefixScores(torch.autograd.Function):
    """Scaled cosines of every prefix of ``emb`` with the same prefix of every weight row.

    forward(emb (B, D), weight (R, D), dims, scale, scratch) -> (S, B, R) float32,
    ``out[s, b, r] = scale * cos(emb[b, :dims[s]], weight[r, :dims[s]])``.

    Built per segment ``dims[k-1]:dims[k]``: ``D_s = sum_{k <= s} e_k w_k^T`` and
    ``out_s = row_s * col_s * D_s`` with ``row_s = scale / |e_{:d_s}|`` (B,),
    ``col_s = 1 / |w_{:d_s}|`` (R,). The row scale rides on the matmul input and the
    cumulative add (``out_k = (row_k e_k) w_k^T + (row_k / row_{k-1}) out_{k-1}``), so the
    only extra pass over the scores is the column scale; the backward mirrors this.
    """

    @staticmethod
    def forward(ctx, emb, weight, dims, scale, scratch):
        dt = _matmul_dtype(emb.device.type)
        segs = list(zip((0, *dims[:-1]), dims))
        emb, weight = emb.float(), weight.float()
        e_sq = torch.stack([emb[:, a:b].square().sum(1) for a, b in segs]).cumsum(0)  # (S, B)
        w_sq = torch.stack([weight[:, a:b].square().sum(1) for a, b in segs]).cumsum(0)  # (S, R)
        row = scale * e_sq.clamp_min(EPS**2).rsqrt()  # (S, B)
        col = w_sq.clamp_min(EPS**2).rsqrt()  # (S, R)
        out = scratch.take((len(dims), len(emb), len(weight)), emb)  # (S, B, R)
        for k, (a, b) in enumerate(segs):
            e_k, w_k = (emb[:, a:b] * row[k, :, None]).to(dt), weight[:, a:b].to(dt)  # (B, n), (R, n)
            if dt == torch.float32:
                torch.mm(e_k, w_k.T, out=out[k])
            else:  # low-precision product, accumulated in float32
                out[k].copy_(torch.mm(e_k, w_k.T))
            if k:
                out[k].addcmul_(out[k - 1], (row[k] / row[k - 1])[:, None])
        out.mul_(col[:, None, :])
        ctx.save_for_backward(emb, weight, row, col, e_sq, w_sq, out)
        ctx.dims, ctx.dt, ctx.scratch = dims, dt, scratch
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # grad (S, B, R)
        emb, weight, row, col, e_sq, w_sq, out = ctx.saved_tensors
        segs = list(zip((0, *ctx.dims[:-1]), ctx.dims))
        dt = ctx.dt
        # Norm terms: sums over classes and over the batch of grad * out, written into
        # ``out`` (no longer needed).
        prod = out.mul_(grad)
        per_row, per_col = prod.sum(2), prod.sum(1)  # (S, B), (S, R)
        # dL/dD_s = grad_s row_s col_s, and segment k collects sum_{s >= k} of it. Build
        # n_k = that sum / row_k backwards in place: n_k = grad_k col_k + (row_{k+1}/row_k) n_{k+1}.
        # ``grad`` is the cross-entropy's buffer (or amax's), read by no one else: reuse it.
        n = grad.mul_(col[:, None, :])  # (S, B, R)
        for k in range(len(segs) - 2, -1, -1):
            n[k].addcmul_(n[k + 1], (row[k + 1] / row[k])[:, None])
        # Prefix norms: out_s scales as e_sq_s^(-1/2), so dL/d e_sq_s = -per_row_s / (2 e_sq_s),
        # and e_sq_s sums |e_k|^2 over k <= s.
        de = -_rev_cumsum(per_row / e_sq * (e_sq > EPS**2))  # (S, B): coefficient of e_k
        dw = -_rev_cumsum(per_col / w_sq * (w_sq > EPS**2))  # (S, R): coefficient of w_k
        # Every column of both gradients is written below (the weight has dims[-1] columns).
        grad_emb, grad_w = torch.empty_like(emb), torch.empty_like(weight)
        for k, (a, b) in enumerate(segs):
            n_k, e_k, w_k = n[k].to(dt), emb[:, a:b], weight[:, a:b]
            grad_emb[:, a:b] = torch.mm(n_k, w_k.to(dt)).float() * row[k, :, None] + e_k * de[k, :, None]
            if dt == torch.float32:  # the norm term first, the product added in place (no temporaries)
                torch.mul(w_k, dw[k, :, None], out=grad_w[:, a:b]).addmm_(n_k.T, e_k * row[k, :, None])
            else:
                grad_w[:, a:b] = torch.mm(n_k.T, (e_k * row[k, :, None]).to(dt)).float() + w_k * dw[k, :, None]
        ctx.scratch.give(out)
        ctx.scratch.give(grad)
        return grad_emb, grad_w, None, None, None


class _MarginCrossEntropy(torch.autograd.Function):
    """Cross-entropy of score rows whose target entry is replaced by a margin logit.

    forward(logits (S, B, C), labels (B,), target_logit (S, B), target_slope (S, B),
    shift (S, B) or None, scratch) -> per-row loss (S, B),
    ``logsumexp(logits with [s, b, labels[b]] := target_logit[s, b]) - target_logit``.
    ``target_logit = f(logits[s, b, labels[b]])`` is computed by the caller (the margin)
    with slope ``f'``, so the target entry's gradient is ``(p_target - 1) * f'``. ``shift``
    (a row maximum) keeps exp in range; None when logits are known to be small.
    """

    @staticmethod
    def forward(ctx, logits, labels, target_logit, target_slope, shift, scratch):
        S, B, _ = logits.shape
        idx = labels.view(1, B, 1).expand(S, B, 1)
        e = scratch.take(logits.shape, logits)  # (S, B, C): the one large buffer
        if shift is None:
            torch.exp(logits, out=e)
            shift = torch.zeros_like(target_logit)
        else:
            torch.sub(logits, shift.unsqueeze(2), out=e).exp_()
        e.scatter_(2, idx, (target_logit - shift).exp().unsqueeze(2))
        z = e.sum(2)  # (S, B)
        ctx.e, ctx.z, ctx.idx, ctx.slope = e, z, idx, target_slope  # backward overwrites e
        return z.log() + shift - target_logit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # grad (S, B)
        e, z, idx = ctx.__dict__.pop("e", None), ctx.z, ctx.idx
        if e is None:  # e and the score buffer are overwritten by the first backward
            raise RuntimeError("MatryoshkaMarginLoss: one backward per forward (retain_graph is not supported)")
        p = e.mul_((grad / z).unsqueeze(2))  # softmax times the upstream gradient
        p_t = p.gather(2, idx).squeeze(2)
        p.scatter_(2, idx, ((p_t - grad) * ctx.slope).unsqueeze(2))  # (p_t - 1) f' grad
        return p, None, None, None, None, None


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
        self._scratch = _Scratch()  # reused score-sized buffers (not state)

    def set_margin(self, margin: float) -> None:
        """Set the angular margin (radians); the fit warms it up from 0 over the first epochs."""
        m = float(margin) if self.kind == "aam" else 0.0
        self.margin = m
        self._cos_m, self._sin_m = math.cos(m), math.sin(m)
        # Past theta = pi - m, cos(theta + m) would rise again; use a linear continuation.
        self._th = math.cos(math.pi - m)
        self._mm = math.sin(math.pi - m) * m

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
            sc = _PrefixScores.apply(emb, weights[0], self.dims, self.scale, self._scratch)
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
        sin = (1.0 - cos.square()).clamp(0, 1).sqrt()
        phi = cos * self._cos_m - sin * self._sin_m  # cos(theta + m)
        # d cos(theta + m) / d cos(theta) = cos m + sin m cos(theta) / sin(theta); at
        # |cos| = 1 (sin = 0) the limit is infinite: use cos m there, as autograd through
        # the clamp above would.
        slope = torch.where(sin > 1e-6, self._cos_m + self._sin_m * cos / sin.clamp_min(1e-6),
                            torch.full_like(cos, self._cos_m))
        keep = cos > 0 if self.easy_margin else cos > self._th
        fallback = cos if self.easy_margin else cos - self._mm
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
        per = _MarginCrossEntropy.apply(sc, labels, target_logit, slope, shift, self._scratch)  # (S, B)
        dim_losses = per.mean(1)  # (S,)
        total = (dim_losses * self.dim_weights).sum()
        return total, dim_losses, dim_acc
