"""ECAPA-TDNN over frames, ending in the Matryoshka projection.

B. Desplanques, J. Thienpondt, K. Demuynck, "ECAPA-TDNN: Emphasized Channel Attention,
Propagation and Aggregation in TDNN Based Speaker Verification", Interspeech 2020,
pp. 3830-3834, doi:10.21437/Interspeech.2020-2650.

Reads top to bottom: SE-Res2 bottleneck block, attentive statistics pooling with global
context, the model. Frames (B, in_dim, T) -> Conv1d k5 -> ``len(dilations)`` SE-Res2
blocks (k3, dilations 2, 3, 4, 5 by default: 4 blocks as the PTM + handcrafted trainer
uses; the paper has 3) -> multi-layer feature aggregation (concatenated block outputs,
1x1 conv to ``mfa_channels``) -> attentive statistics pooling -> BatchNorm + linear to
``dims[-1]`` (the Matryoshka projection, so every smaller size in ``dims`` is a prefix;
``dims=[512]`` is a fixed 512-D embedding as in the paper's 192/512-D heads).
Widths are arguments, so tests build tiny ones (e.g. channels 16, scale 4).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mrlcache.models.matryoshka import MatryoshkaHead


def _conv_relu_bn(cin, cout, kernel=1, dilation=1):
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, dilation=dilation, padding=dilation * (kernel // 2)),
                         nn.ReLU(), nn.BatchNorm1d(cout))


class SERes2Block(nn.Module):
    """1x1 conv -> Res2 dilated convs (``scale`` groups) -> 1x1 conv -> squeeze-excitation, residual.

    (B, C, T) -> (B, C, T). Res2: the channels are split into ``scale`` groups; group 0
    passes through, group i > 0 is convolved after adding group i - 1's output, which
    widens the receptive field step by step inside one block.
    """

    def __init__(self, channels: int, kernel: int, dilation: int, scale: int, se_bottleneck: int):
        super().__init__()
        if channels % scale:
            raise ValueError(f"ECAPA channels {channels} are not divisible by the Res2 scale {scale}")
        width = channels // scale
        self.scale = scale
        self.conv_in = _conv_relu_bn(channels, channels)
        self.res2 = nn.ModuleList(_conv_relu_bn(width, width, kernel, dilation) for _ in range(scale - 1))
        self.conv_out = _conv_relu_bn(channels, channels)
        self.se = nn.Sequential(nn.Linear(channels, se_bottleneck), nn.ReLU(),
                                nn.Linear(se_bottleneck, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_in(x)
        groups = torch.chunk(y, self.scale, dim=1)
        outs, prev = [groups[0]], None
        for conv, g in zip(self.res2, groups[1:]):
            prev = conv(g if prev is None else g + prev)
            outs.append(prev)
        y = self.conv_out(torch.cat(outs, dim=1))
        y = y * self.se(y.mean(dim=2)).unsqueeze(2)  # (B, C, 1) channel gates
        return x + y


class AttentiveStatsPool(nn.Module):
    """Channel- and context-dependent attentive statistics pooling: (B, C, T) -> (B, 2C).

    The attention of each frame and channel sees the frame and the utterance's mean and
    standard deviation ("global context" in the paper).
    """

    def __init__(self, channels: int, bottleneck: int = 128):
        super().__init__()
        self.attention = nn.Sequential(nn.Conv1d(3 * channels, bottleneck, 1), nn.ReLU(), nn.BatchNorm1d(bottleneck),
                                       nn.Tanh(), nn.Conv1d(bottleneck, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        mean = x.mean(dim=2, keepdim=True)
        std = x.var(dim=2, keepdim=True, unbiased=False).clamp_min(1e-6).sqrt()
        context = torch.cat([x, mean.expand(-1, -1, t), std.expand(-1, -1, t)], dim=1)  # (B, 3C, T)
        w = torch.softmax(self.attention(context), dim=2)  # (B, C, T), sums to 1 over time
        mu = (w * x).sum(dim=2)
        sigma = ((w * x * x).sum(dim=2) - mu * mu).clamp_min(1e-6).sqrt()
        return torch.cat([mu, sigma], dim=1)


class ECAPATDNN(nn.Module):
    """ECAPA-TDNN head: frames (B, in_dim, T) -> Matryoshka embedding (B, dims[-1]).

    Args:
        in_dim: feature size per frame (a stream or a fusion output).
        dims: nested embedding sizes (strictly increasing); the output is dims[-1] wide.
        channels: width C of the blocks (512 or 1024 in the paper).
        scale: Res2 groups (8 in the paper); must divide ``channels``.
        dilations: one SE-Res2 block per entry.
        mfa_channels: width after multi-layer feature aggregation (1536 in the paper).
        attention_bottleneck, se_bottleneck: hidden widths of the pooling attention and SE.
    All frames of a batch must be real (fixed-length crops); embed ragged utterances one
    at a time.
    """

    reads = "frames"
    width_arg = "in_dim"

    def __init__(self, in_dim: int, dims: Sequence[int] = (192,), channels: int = 512, scale: int = 8,
                 dilations: Sequence[int] = (2, 3, 4, 5), mfa_channels: int = 1536,
                 attention_bottleneck: int = 128, se_bottleneck: int = 128):
        super().__init__()
        self._args = {"in_dim": int(in_dim), "dims": [int(d) for d in dims], "channels": int(channels),
                      "scale": int(scale), "dilations": [int(d) for d in dilations],
                      "mfa_channels": int(mfa_channels), "attention_bottleneck": int(attention_bottleneck),
                      "se_bottleneck": int(se_bottleneck)}
        self.in_dim = int(in_dim)
        self.stem = _conv_relu_bn(in_dim, channels, kernel=5)
        self.blocks = nn.ModuleList(SERes2Block(channels, 3, d, scale, se_bottleneck) for d in dilations)
        self.mfa = _conv_relu_bn(channels * len(dilations), mfa_channels)
        self.pool = AttentiveStatsPool(mfa_channels, attention_bottleneck)
        self.embedding = MatryoshkaHead(2 * mfa_channels, dims)  # BN + linear: the embedding layer
        self.dims = self.embedding.dims
        self.pooled_dim = None  # reads frames, not a pooled vector

    @staticmethod
    def option_args(options) -> dict:
        """The fit options ``ecapa_channels``, ``ecapa_scale``, ``ecapa_mfa_channels`` and
        ``ecapa_bottleneck`` (the SE and the pooling attention share it)."""
        return {"channels": options.ecapa_channels, "scale": options.ecapa_scale,
                "mfa_channels": options.ecapa_mfa_channels, "attention_bottleneck": options.ecapa_bottleneck,
                "se_bottleneck": options.ecapa_bottleneck}

    def args(self) -> dict:
        """What rebuilds this head: ``ECAPATDNN(**args)``."""
        return dict(self._args)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, T) -> pooled statistics (B, 2 * mfa_channels)."""
        if x.ndim != 3 or x.shape[1] != self.in_dim:
            raise ValueError(f"ECAPA-TDNN expects frames (B, {self.in_dim}, T), got {tuple(x.shape)}")
        x = self.stem(x)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return self.pool(self.mfa(torch.cat(outs, dim=1)))  # aggregate every block's output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, T) -> (B, dims[-1]), raw (the loss and scoring normalise prefixes)."""
        return self.embedding(self.pooled(x))
