"""ReDimNet's building blocks: the small layers, 2D blocks and 1D time-context blocks.

Shapes follow the network's two views of one tensor: 2D (B, C, F, T) and 1D (B, F*C, T)
(see :mod:`mrlcache.backbone.redimnet`, which assembles them into the backbone). Module and
parameter names equal those of the published checkpoints, so state_dicts load strictly.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ConfigError(ValueError):
    """A model_config that this implementation cannot build (unknown key or setting)."""


# --------------------------------------------------------------------------------------
# Small layers
# --------------------------------------------------------------------------------------


class LayerNormCF(nn.Module):
    """LayerNorm over the channel axis (dim 1) of (B, C, ...) tensors, eps 1e-6."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):  # (B, C, ...) -> same shape, float32 (as autocast does for layer_norm)
        x = x.float()
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return self.weight.view(shape) * x + self.bias.view(shape)


class To1d(nn.Module):
    """[B, c, f, t] -> [B, f*c, t] (frequency-major, so to2d is its exact inverse)."""

    def forward(self, x):
        b, c, f, t = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, f * c, t)


class To2d(nn.Module):
    """[B, f*c, t] -> [B, c, f, t]."""

    def __init__(self, f, c):
        super().__init__()
        self.f, self.c = f, c

    def forward(self, x):
        b, _, t = x.shape
        return x.reshape(b, self.f, self.c, t).permute(0, 2, 1, 3)


class WeightedSum(nn.Module):
    """Sum of N earlier 1D outputs with weights softmax-normalised over N, per channel.

    With N = 1 the weight is a frozen [1, 1, 1, 1] zero (softmax gives 1), as published.
    """

    def __init__(self, n, channels):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, n, channels if n > 1 else 1, 1), requires_grad=n > 1)

    def forward(self, xs):  # list of N tensors (B, F*C, T) -> (B, F*C, T)
        w = torch.softmax(self.w, dim=1)  # (1, N, F*C, 1)
        # Accumulated one output at a time: stacking N (B, F*C, T) tensors first cost a
        # copy of all of them (about 20% of a b2 forward on the CPU).
        out = w[:, 0] * xs[0]
        for i in range(1, len(xs)):
            out = torch.addcmul(out, w[:, i], xs[i])
        return out


# --------------------------------------------------------------------------------------
# 2D blocks (module `conv_block` inside each block slot)
# --------------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """Depthwise-style convs (one per kernel, concatenated) -> BN -> act -> 1x1 conv, residual.

    Used in 2D (stage blocks, kernel 3x3) and 1D (time-context blocks, long kernels).
    """

    def __init__(self, channels, dim, kernel_sizes, groups, act=nn.GELU):
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        n = len(kernel_sizes)
        self.dwconvs = nn.ModuleList(
            conv(channels, channels, k, padding="same", groups=groups) for k in kernel_sizes)
        self.norm = norm(channels * n)
        self.act = act()
        self.pwconv1 = conv(channels * n, channels, 1)

    def forward(self, x):  # (B, C, F, T) or (B, C, T)
        ys = [conv(x) for conv in self.dwconvs]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)  # one kernel: no copy
        return x + self.pwconv1(self.act(self.norm(y)))


class FwSE(nn.Module):
    """Frequency-wise squeeze-excitation: one gate per frequency row."""

    def __init__(self, num_freq, hidden):
        super().__init__()
        self.squeeze = nn.Linear(num_freq, hidden)
        self.exitation = nn.Linear(hidden, num_freq)  # (sic) the published name

    def forward(self, x):  # (B, C, F, T)
        g = x.mean(dim=(1, 3))  # (B, F)
        g = torch.sigmoid(self.exitation(torch.relu(self.squeeze(g))))
        return x * g[:, None, :, None]


class ResBlock(nn.Module):
    """Basic ResNet block with grouped 3x3 + pointwise convs, optional frequency-wise SE."""

    def __init__(self, channels, num_freq, group_divisor, fwse):
        super().__init__()
        c, g = channels, channels // group_divisor
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False, groups=g)
        self.conv1pw = nn.Conv2d(c, c, 1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False, groups=g)
        self.conv2pw = nn.Conv2d(c, c, 1)
        self.bn2 = nn.BatchNorm2d(c)
        self.se = FwSE(num_freq, min(64, max(c, 32))) if fwse else nn.Identity()

    def forward(self, x):  # (B, C, F, T)
        # ReLU before BN in the first half is how the published models were trained.
        y = self.bn1(torch.relu(self.conv1pw(self.conv1(x))))
        y = self.se(self.bn2(self.conv2pw(self.conv2(y))))
        return torch.relu(x + y)


class Block2d(nn.Module):
    """A stage block slot; the wrapper exists because the checkpoints name it `conv_block`."""

    def __init__(self, conv_block):
        super().__init__()
        self.conv_block = conv_block

    def forward(self, x):
        return self.conv_block(x)


# (channels, num_freq, group_divisor) -> block. Kernel sizes in stages_setup are not used:
# the reference builds 3x3 blocks whatever they say, so we do too.
BLOCKS_2D = {
    "convnext_like": lambda c, f, gd: ConvNeXtBlock(c, 2, [(3, 3)], groups=c // gd),
    "convnext_like_relu": lambda c, f, gd: ConvNeXtBlock(c, 2, [(3, 3)], groups=c // gd, act=nn.ReLU),
    "basic_resnet": lambda c, f, gd: ResBlock(c, f, gd, fwse=False),
    "basic_resnet_fwse": lambda c, f, gd: ResBlock(c, f, gd, fwse=True),
}


# --------------------------------------------------------------------------------------
# 1D time-context blocks
# --------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention, (B, T, C) -> (B, T, C)."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        # Registration order k, v, q, out matches the published state_dict order.
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape

        def split(y):  # (B, T, C) -> (B, H, T, C/H)
            return y.view(b, t, self.heads, c // self.heads).transpose(1, 2)

        # Default SDPA scale is head_dim ** -0.5, the published query scaling.
        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    """Linear -> tanh-approximate GELU -> Linear."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, hidden)
        self.output_dense = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.output_dense(F.gelu(self.intermediate_dense(x), approximate="tanh"))


class TransformerLayer(nn.Module):
    """Post-norm transformer encoder layer, channels-first in and out: (B, C, T)."""

    def __init__(self, dim, mlp, heads=4):
        super().__init__()
        self.attention = Attention(dim, heads)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feed_forward = FeedForward(dim, mlp)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):  # (B, C, T)
        x = x.transpose(1, 2)  # (B, T, C)
        x = self.layer_norm(x + self.attention(x))
        x = self.final_layer_norm(x + self.feed_forward(x))
        return x.transpose(1, 2)


class PosEncConv(nn.Module):
    """Convolutional positional encoding: x + LN(depthwise conv(x))."""

    def __init__(self, dim, kernel=59):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = LayerNormCF(dim)

    def forward(self, x):  # (B, C, T)
        return x + self.norm(self.conv(x))


def _depthwise_1d(h, kernels):
    return ConvNeXtBlock(h, 1, kernels, groups=h)


# hidden width hC -> the `tcm` Sequential of a time-context block.
TIME_CONTEXT = {
    "att": lambda h: nn.Sequential(PosEncConv(h, 59), TransformerLayer(h, 2 * h)),
    "conv+att": lambda h: nn.Sequential(*[_depthwise_1d(h, [k]) for k in (7, 19, 31, 59)], TransformerLayer(h, h)),
    "conv": lambda h: nn.Sequential(*[_depthwise_1d(h, [7, 15, 31]) for _ in range(4)]),
    "fc": lambda h: nn.Sequential(nn.Conv1d(h, 2 * h, 1), LayerNormCF(2 * h), nn.GELU(), nn.Conv1d(2 * h, h, 1)),
}


class TimeContextBlock(nn.Module):
    """Bottleneck residual block over time on the 1D view: (B, F*C, T) -> same."""

    def __init__(self, dim, hidden, block_type):
        super().__init__()
        self.red_dim_conv = nn.Sequential(nn.Conv1d(dim, hidden, 1), LayerNormCF(hidden))
        self.tcm = TIME_CONTEXT[block_type](hidden)
        self.exp_dim_conv = nn.Conv1d(hidden, dim, 1)

    def forward(self, x):
        return x + self.exp_dim_conv(self.tcm(self.red_dim_conv(x)))
