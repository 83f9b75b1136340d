"""The inference copy's layers: ReDimNet's (F, T) layers rewritten for the time-major layout.

Each takes the model's own layer (and the BatchNorm slice folded into it) and computes it on
the copy's layout: 2-D tensors as (B, C, T, F) in channels-last memory, 1-D ones as (B, T, C).
:mod:`mrlcache.backbone.inference` assembles them into blocks and stages; docs/model.md says
why each one is written as it is.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mrlcache.backbone import blocks as B
from mrlcache.backbone import gconv

CL = torch.channels_last


def _bn_scale_shift(bn):
    """Eval-mode BatchNorm as y = x * scale + shift, both (C,)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _param(t):
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class Conv2dT(nn.Module):
    """A Conv2d of the (F, T) model applied to (B, C, T, F) channels-last: kernel transposed.

    Optionally folds an eval BatchNorm's slice (scale, shift) into the output channels.
    """

    def __init__(self, conv, scale=None, shift=None):
        super().__init__()
        w = conv.weight.detach().transpose(2, 3)  # (O, I/g, kF, kT) -> (O, I/g, kT, kF)
        b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        if scale is not None:
            w = w * scale.view(-1, 1, 1, 1)
            b = b * scale + shift
        self.kernel = None  # the small-group kernel's packed weight (backbone/gconv.py), when it applies
        if w.device.type == "cpu" and gconv.supports(conv) and gconv.available() is None:
            self.kernel = _param(gconv.pack(w))
        w, self.groups = _packed_groups(w, conv.groups)
        self.weight = _param(w.contiguous(memory_format=CL))
        self.bias = _param(b)
        self.stride = tuple(conv.stride[::-1])
        kt, kf = w.shape[2:]
        if conv.padding == "same" or conv.padding == (kf // 2, kt // 2):
            self.padding = (kt // 2, kf // 2)
            if kt % 2 == 0 or kf % 2 == 0:
                raise B.ConfigError("even 'same' kernels are not supported by the inference copy")
        elif conv.padding == (0, 0):
            self.padding = (0, 0)
        else:
            raise B.ConfigError(f"padding {conv.padding} is not supported by the inference copy")

    def _on_kernel(self, x) -> bool:
        return self.kernel is not None and x.device.type == "cpu" and x.dtype == torch.float32

    def forward(self, x):  # (B, C, T, F) channels-last
        if self._on_kernel(x):
            return gconv.conv3x3(x, self.kernel, self.bias)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)

    def then(self, act, x):
        """act(self(x)); GELU inside the kernel's output loop when the kernel computes the conv."""
        if isinstance(act, nn.GELU) and act.approximate == "none" and self._on_kernel(x):
            return gconv.conv3x3(x, self.kernel, self.bias, gelu=True)
        return act(self(x))


PACK = 8  # channels a group of a grouped convolution is widened to: one AVX2 vector of float32


def _packed_groups(w, groups):
    """A grouped convolution's weight (O, I/g, kT, kF) with groups of fewer than PACK channels
    merged into block-diagonal groups of PACK channels; returns (weight, groups). Each output
    still sums only its own group's inputs (the other terms are exact zeros). oneDNN vectorises a
    group's channels: b2's groups of 4 ran 1.4-1.5x faster as groups of 8 on this AVX2 CPU, for
    twice the multiplications (benchmarks/README.md). Depthwise convolutions (1 channel a group)
    stay as they are: oneDNN's depthwise kernel ran 7-8x faster than the 8-channel packing.
    Groups of 2 and 4 go to the kernel of backbone/gconv.py where it is available.
    """
    o, per = w.shape[:2]
    if groups == 1 or per == 1 or per >= PACK or PACK % per or o % PACK or (o // groups) != per:
        return w, groups
    merge, packed = PACK // per, w.new_zeros(o, PACK, *w.shape[2:])  # merge: original groups per packed group
    for out in range(o):  # (out // per) % merge: the original group's slot inside its packed group
        packed[out, (out // per) % merge * per:][:per] = w[out]
    return packed, groups // merge


class Pointwise2d(nn.Module):
    """A Conv2d with kernel (s, 1) and stride (s, 1) over frequency (1x1 when s = 1) as one matmul.

    On (B, C, T, F) channels-last, physically (B, T, F, C): frequency groups of s bins
    become rows of s*C values, so the convolution is ``linear`` on the last axis.
    """

    def __init__(self, conv, scale=None, shift=None):
        super().__init__()
        o, i, s, kt = conv.weight.shape
        if kt != 1 or tuple(conv.stride) != (s, 1) or conv.groups != 1:
            raise B.ConfigError("Pointwise2d needs a (s, 1) kernel with stride (s, 1) and no groups")
        w = conv.weight.detach()[..., 0].permute(0, 2, 1).reshape(o, s * i)  # [o, j*C + c] = W[o, c, j]
        b = conv.bias.detach() if conv.bias is not None else torch.zeros(o, dtype=w.dtype)
        if scale is not None:
            w, b = w * scale[:, None], b * scale + shift
        self.weight, self.bias, self.s = _param(w), _param(b), s

    def forward(self, x):  # (B, C, T, F) channels-last -> (B, O, T, F / s) channels-last
        b, c, t, f = x.shape
        y = x.permute(0, 2, 3, 1).reshape(b, t, f // self.s, self.s * c)  # a view when channels-last
        return F.linear(y, self.weight, self.bias).permute(0, 3, 1, 2)

    def plus(self, x, inp):  # x + self(inp), into x (see _plus_linear)
        return _plus_linear(x.permute(0, 2, 3, 1), inp.permute(0, 2, 3, 1), self).permute(0, 3, 1, 2)


def _plus_linear(x, inp, lin):
    """x + linear(inp) for (..., O) x and (..., I) inp: the bias added to x, the matmul
    accumulated into that (F.linear copies its bias into the output first). Written into x
    when x is contiguous: every caller is a residual block whose input x is a tensor of this
    copy's own making (the previous block's output, or a stage's weighted sum) that nothing
    reads afterwards; the model's stage outputs, which later weighted sums read, are never a
    block's input. In place, the bias pass runs about twice as fast (no fresh pages)."""
    out = x.add_(lin.bias) if x.is_contiguous() else x + lin.bias
    out.view(-1, out.shape[-1]).addmm_(inp.reshape(-1, lin.weight.shape[1]), lin.weight.t())
    return out


def _conv2d(conv, scale=None, shift=None):
    """The fastest equivalent of a (F, T) Conv2d (+ folded BN) on (B, C, T, F) channels-last."""
    s, kt = conv.kernel_size
    if kt == 1 and tuple(conv.stride) == (s, 1) and conv.groups == 1 and conv.padding in ((0, 0), "valid") \
            or (s, kt) == (1, 1) and conv.groups == 1:
        return Pointwise2d(conv, scale, shift)
    return Conv2dT(conv, scale, shift)


class DepthwiseTime(nn.Module):
    """Depthwise Conv1d(s) over time (+ folded BN slices) on (B, T, C) -> (B, T, n*C)."""

    def __init__(self, convs, scale=None, shift=None):
        super().__init__()
        ws, bs, self.pads = [], [], []
        c = convs[0].weight.shape[0]
        for i, conv in enumerate(convs):
            w = conv.weight.detach()  # (C, 1, k)
            b = conv.bias.detach() if conv.bias is not None else torch.zeros(c)
            if scale is not None:
                s, t = scale[i * c:(i + 1) * c], shift[i * c:(i + 1) * c]
                w, b = w * s.view(-1, 1, 1), b * s + t
            k = w.shape[-1]
            if k % 2 == 0:
                raise B.ConfigError("even depthwise kernels are not supported by the inference copy")
            ws.append(_param(w.unsqueeze(2).contiguous(memory_format=CL)))  # (C, 1, 1, k)
            bs.append(_param(b))
            self.pads.append(k // 2)
        self.weights, self.biases = nn.ParameterList(ws), nn.ParameterList(bs)

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape
        x2 = x.view(b, 1, t, c).permute(0, 3, 1, 2)  # (B, C, 1, T) channels-last: a view
        ys = [F.conv2d(x2, w, bias, 1, (0, p), 1, c) for w, bias, p in zip(self.weights, self.biases, self.pads)]
        ys = [y.permute(0, 2, 3, 1).reshape(b, t, c) for y in ys]  # views when channels-last
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)


class Linear1x1(nn.Module):
    """A Conv1d 1x1 (+ folded BN) as ``linear`` on (B, T, I) -> (B, T, O)."""

    def __init__(self, conv, scale=None, shift=None):
        super().__init__()
        w, b = conv.weight.detach()[:, :, 0], conv.bias.detach()
        if scale is not None:
            w, b = w * scale[:, None], b * scale + shift
        self.weight, self.bias = _param(w), _param(b)

    def forward(self, x):  # (B, T, I) -> (B, T, O)
        return F.linear(x, self.weight, self.bias)

    def plus(self, x, inp):  # x + self(inp), into x (see _plus_linear)
        return _plus_linear(x, inp, self)


class LayerNormLast(nn.Module):
    """LayerNormCF (float32, eps from the module) on the last axis."""

    def __init__(self, ln):
        super().__init__()
        self.weight, self.bias, self.eps = _param(ln.weight), _param(ln.bias), ln.eps

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight, self.bias, self.eps)
