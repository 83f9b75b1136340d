"""Fused autograd kernels of the Matryoshka margin loss (:mod:`mrlcache.fit.losses`).

Cost: the class scores dominate a head step (batch 256, 5994 classes, 4 sizes: ~6M
logits). These choices keep a step near its matmul cost (2-core CPU, b2 geometry:
110-120 ms per step before, 41-48 ms after; see benchmarks/README.md):

- the margin touches only the ``B`` target logits per size: they are gathered from the
  score matrix, given ``cos(theta + m)`` through cos/sin identities (no ``acos``) with
  its slope, and put back inside the cross-entropy; nothing margin-related runs over
  the full logits;
- cross-entropy is one pass per direction (:class:`MarginCrossEntropy`): ``exp`` into
  one buffer and a row sum forward, the softmax gradient written into the same buffer
  backward; no log-softmax, one-hot or gather/scatter tensors of that size;
- with the shared classifier, prefix dot products are built segment by segment
  (:class:`PrefixScores`): one ``(B, 64) x (64, C)`` matmul per segment, accumulated
  over segments, with prefix norms from cumulative sums of squared segment norms: 2.5x
  fewer FLOPs than one matmul per prefix for 64/128/192/256, and the scaling rides on
  the accumulation so it costs one extra pass over the scores each way;
- the two score-sized buffers are reused from step to step (:class:`Scratch`): fresh
  25 MB tensors are paged in anew on every step, which cost more than the arithmetic.
"""

from __future__ import annotations

import torch

EPS = 1e-12  # as F.normalize: vectors shorter than this are not scaled up


def _matmul_dtype(device_type: str) -> torch.dtype:
    """bf16/fp16 when autocast is on (``--precision bf16`` on the CPU, AMP on CUDA), else float32."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


def _rev_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sum from the last row backwards along dim 0: out[k] = sum_{s >= k} x[s]."""
    return x.flip(0).cumsum(0).flip(0)


class Scratch:
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


class PrefixScores(torch.autograd.Function):
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


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (D,), per coordinate."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # grad (B, D)
        (factor,) = ctx.saved_tensors
        return grad * factor.to(grad.dtype), None


class MarginCrossEntropy(torch.autograd.Function):
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
