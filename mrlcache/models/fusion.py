"""Stream encoders and fusions: from cached streams to one frame sequence (or vector) for a head.

Encoders bring each stream to a common width:

- :class:`LayerWeightedSum` for ``layers``: a learned softmax-weighted sum over the layers
  (as SUPERB and ReDimNet's own aggregation do), then an optional 1x1 projection; works on
  frames (B, L, D, T) and on per-layer pooled vectors (B, L, D);
- :class:`CNN1dEncoder` for handcrafted frames (fbank / MFCC / F0 features concatenated
  per frame, e.g. 80 + 2): Conv1d-ReLU-BN layers, 768 wide by default;
- pooled vectors pass through (``nn.Identity``).

Fusions (registered in :data:`mrlcache.models.FUSIONS`; ``frames_only`` says whether one
also fuses pooled vectors) take a list of encoded streams, all (B, D_i, T_i) frames or all (B, D_i) vectors,
and return (B, out_dim, T) frames (T = the first stream's length) or (B, out_dim):

- :class:`ConcatFusion`: concatenate the channels, 1x1 projection;
- :class:`CrossAttentionFusion`: each frame stream attends to the frames of the others
  (multi-head, 8 heads), residual + LayerNorm, then concatenation + projection;
- :class:`GatingFusion`: a softmax gate between the projected streams, per frame or per
  utterance; ``last_gates`` holds the gate values of the latest forward for analysis.

Streams at different frame rates or lengths (ReDimNet layers have T // 160 + 1 frames,
Kaldi features 1 + (T - 400) // 160, PTMs 50 per second) are brought to the first stream's
length by :func:`match_length` (linear interpolation over time).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def match_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Frames (B, D, T) -> (B, D, length) by linear interpolation over time (no-op if equal)."""
    if x.shape[-1] == length:
        return x
    return F.interpolate(x, size=length, mode="linear", align_corners=False)


class LayerWeightedSum(nn.Module):
    """Softmax-weighted sum over layers, then an optional projection.

    Args: num_layers L; dim D of each layer; out_dim: projection width (None: keep D).
    Shapes: (B, L, D, T) -> (B, out_dim, T), or pooled (B, L, D) -> (B, out_dim).
    """

    def __init__(self, num_layers: int, dim: int, out_dim: int | None = None):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))  # equal weights at the start
        self.proj = nn.Linear(dim, out_dim) if out_dim else None
        self.num_layers, self.out_dim = num_layers, out_dim or dim

    def weights(self) -> torch.Tensor:
        """The layer weights (L,), summing to one."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim not in (3, 4) or x.shape[1] != self.num_layers:
            raise ValueError(f"expected layers (B, {self.num_layers}, D, T) or (B, {self.num_layers}, D), "
                             f"got {tuple(x.shape)}")
        w = self.weights().view(1, -1, *([1] * (x.ndim - 2)))
        y = (w * x.float()).sum(dim=1)  # (B, D, T) or (B, D)
        if self.proj is None:
            return y
        return self.proj(y) if y.ndim == 2 else self.proj(y.transpose(1, 2)).transpose(1, 2)


class CNN1dEncoder(nn.Module):
    """Handcrafted frames (B, in_dim, T) -> (B, out_dim, T): input BN, then Conv1d-ReLU-BN layers.

    The input BatchNorm puts log energies, cepstra and log F0 on one scale; kernels of 5
    frames (50 ms) see local dynamics (deltas) without explicit delta features.
    """

    def __init__(self, in_dim: int, out_dim: int = 768, hidden: int = 512, num_layers: int = 3, kernel: int = 5):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(in_dim)]
        widths = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv1d(a, b, kernel, padding=kernel // 2), nn.ReLU(), nn.BatchNorm1d(b)]
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.in_dim:
            raise ValueError(f"CNN1dEncoder expects frames (B, {self.in_dim}, T), got {tuple(x.shape)}")
        # A check on the values: eager runs only (an exported or traced graph has no branch on data).
        if not (torch.compiler.is_exporting() or torch.jit.is_tracing()) and not torch.isfinite(x).all():
            raise ValueError("CNN1dEncoder input has NaN/inf: pass the f0 stream through "
                             "mrlcache.streams.f0_features first")
        return self.net(x.float())


def _check_inputs(xs: Sequence[torch.Tensor], in_dims: Sequence[int]) -> bool:
    """True for frames, False for vectors; ValueError on a mismatch."""
    if len(xs) != len(in_dims):
        raise ValueError(f"fusion built for {len(in_dims)} streams, got {len(xs)}")
    ndims = {x.ndim for x in xs}
    if ndims not in ({2}, {3}):
        raise ValueError(f"fusion inputs must all be frames (B, D, T) or all vectors (B, D), "
                         f"got shapes {[tuple(x.shape) for x in xs]}")
    for i, (x, d) in enumerate(zip(xs, in_dims)):
        if x.shape[1] != d:
            raise ValueError(f"fusion input {i} has width {x.shape[1]}, expected {d}")
    return ndims == {3}


def _project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear over channels of (B, D, T) frames or (B, D) vectors."""
    return layer(x) if x.ndim == 2 else layer(x.transpose(1, 2)).transpose(1, 2)


class ConcatFusion(nn.Module):
    """Concatenate the streams' channels, then project: -> (B, out_dim, T) or (B, out_dim)."""

    frames_only = False  # fuses frames or vectors

    def __init__(self, in_dims: Sequence[int], out_dim: int):
        super().__init__()
        self.in_dims = tuple(in_dims)
        self.proj = nn.Linear(sum(self.in_dims), out_dim)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        frames = _check_inputs(xs, self.in_dims)
        if frames:
            xs = [match_length(x, xs[0].shape[-1]) for x in xs]
        return _project(self.proj, torch.cat(list(xs), dim=1))


class CrossAttentionFusion(nn.Module):
    """Each frame stream queries the frames of the other streams (multi-head attention).

    Every stream is projected to ``out_dim``; stream i's frames attend to the concatenated
    frames of the others (no length matching needed there), ``y_i = LN(x_i + attn)``; the
    y_i are brought to the first stream's length, concatenated and projected.
    (B, D_i, T_i) x n -> (B, out_dim, T_0). Needs at least two frame streams.
    """

    frames_only = True  # attention needs frames; pooled vectors have none

    def __init__(self, in_dims: Sequence[int], out_dim: int, heads: int = 8):
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError("cross-attention fusion needs at least two streams")
        if out_dim % heads:
            raise ValueError(f"cross-attention width {out_dim} is not divisible by {heads} heads")
        self.in_dims = tuple(in_dims)
        self.inputs = nn.ModuleList(nn.Linear(d, out_dim) for d in in_dims)
        self.attention = nn.ModuleList(nn.MultiheadAttention(out_dim, heads, batch_first=True) for _ in in_dims)
        self.norms = nn.ModuleList(nn.LayerNorm(out_dim) for _ in in_dims)
        self.proj = nn.Linear(len(in_dims) * out_dim, out_dim)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        if not _check_inputs(xs, self.in_dims):
            raise ValueError("cross-attention fusion needs frame streams (B, D, T), not pooled vectors")
        zs = [lin(x.transpose(1, 2)) for lin, x in zip(self.inputs, xs)]  # (B, T_i, out_dim)
        ys = []
        for i, (attn, norm) in enumerate(zip(self.attention, self.norms)):
            others = torch.cat([z for j, z in enumerate(zs) if j != i], dim=1)  # (B, sum T_j, out_dim)
            a, _ = attn(zs[i], others, others, need_weights=False)
            ys.append(match_length(norm(zs[i] + a).transpose(1, 2), zs[0].shape[1]))
        return _project(self.proj, torch.cat(ys, dim=1))


class GatingFusion(nn.Module):
    """A learned softmax gate between the projected streams: sum_i g_i * proj_i(x_i).

    Args: in_dims; out_dim; per_frame: one gate per frame (else per utterance, from the
    streams' means over time; vectors always get one gate per utterance).
    After each forward ``last_gates`` holds the gates, detached: (B, n, T) or (B, n),
    summing to one over the n streams.
    """

    frames_only = False

    def __init__(self, in_dims: Sequence[int], out_dim: int, per_frame: bool = True):
        super().__init__()
        self.in_dims, self.per_frame = tuple(in_dims), per_frame
        self.inputs = nn.ModuleList(nn.Linear(d, out_dim) for d in in_dims)
        self.gate = nn.Linear(len(in_dims) * out_dim, len(in_dims))
        self.last_gates: torch.Tensor | None = None

    def forward(self, xs: Sequence[torch.Tensor], return_gates: bool = False):
        frames = _check_inputs(xs, self.in_dims)
        if frames:
            xs = [match_length(x, xs[0].shape[-1]) for x in xs]
        zs = torch.stack([_project(lin, x) for lin, x in zip(self.inputs, xs)], dim=1)  # (B, n, D[, T])
        flat = zs.flatten(1, 2)  # (B, n*D[, T])
        if frames and self.per_frame:
            gates = torch.softmax(_project(self.gate, flat), dim=1)  # (B, n, T)
        else:
            summary = flat.mean(dim=2) if frames else flat
            gates = torch.softmax(self.gate(summary), dim=1)  # (B, n)
        self.last_gates = gates.detach()
        g = gates.unsqueeze(2) if gates.ndim == 3 else gates.view(*gates.shape, *([1] * (zs.ndim - 2)))
        fused = (g * zs).sum(dim=1)
        return (fused, gates) if return_gates else fused


class MeanStdPool(nn.Module):
    """(B, D, T) -> (B, 2D) mean and standard deviation over time; vectors pass through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return x
        std, mean = torch.std_mean(x, dim=2, unbiased=False)
        return torch.cat([mean, std], dim=1)
