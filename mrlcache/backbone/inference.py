"""A frozen ReDimNet rewritten for fast inference: time-major layout, BatchNorm folded.

:meth:`mrlcache.backbone.redimnet.ReDimNet.for_inference` returns an :class:`InferenceReDimNet`,
a copy that computes the same ``pooled`` / ``frames`` / ``forward`` (to about 1e-6) from the
same weights, laid out for the CPU's fast kernels. The original model, its state_dict and its
SHA-256 are untouched; the copy has no state_dict of the published format (never save it).

Why each change (b2, 2 AVX2 threads, batch 8 x 2 s; docs/model.md lists them, benchmarks/README.md
has the numbers): one time-major layout, the 2-D view in channels-last memory, so ReDimNet's
2-D <-> 1-D reshapes are free views (the 2-D kernels are transposed to see (time, frequency));
depthwise 1-D convolutions as 1 x k 2-D ones in channels-last (channels-first conv1d with long
kernels ran at about 1 GFLOP/s); 1x1 convolutions and LayerNorms on the 1-D view as ``linear`` /
``layer_norm`` over the last axis; grouped convolutions widened to PACK channels a group;
residual + bias + 1x1 as one in-place matmul; BatchNorm folded into the convolution before it (a
BatchNorm after a ReLU, ResBlock.bn1, stays a scale and shift: folding it into the next
zero-padded convolution would change the borders).
"""

import copy

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

    def forward(self, x):  # (B, C, T, F) channels-last
        if self.kernel is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            return gconv.conv3x3(x, self.kernel, self.bias)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)

    def then(self, act, x):
        """act(self(x)); GELU inside the kernel's output loop when the kernel computes the conv."""
        if (self.kernel is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and isinstance(act, nn.GELU) and act.approximate == "none"):
            return gconv.conv3x3(x, self.kernel, self.bias, gelu=True)
        return act(self(x))


PACK = 8  # channels a group of a grouped convolution is widened to: one AVX2 vector of float32


def _packed_groups(w, groups):
    """A grouped convolution's weight (O, I/g, kT, kF) with groups of fewer than PACK channels
    merged into block-diagonal groups of PACK channels; returns (weight, groups). Each output
    still sums only its own group's inputs (the other terms are exact zeros). oneDNN vectorises a
    group's channels: b2's groups of 4 ran 1.4-1.5x faster as groups of 8 on this AVX2 CPU, for
    twice the multiplications (benchmarks/README.md). Depthwise convolutions (1 channel a group)
    stay as they are: oneDNN has a depthwise kernel, 5-7x faster than the 8-channel packing.
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


class ConvNeXt2d(nn.Module):
    def __init__(self, blk):
        super().__init__()
        if len(blk.dwconvs) != 1:
            raise B.ConfigError("2-D ConvNeXt blocks with several kernels are not supported by the inference copy")
        scale, shift = _bn_scale_shift(blk.norm)
        self.dw = _conv2d(blk.dwconvs[0], scale, shift)
        self.act = blk.act
        self.pw = _conv2d(blk.pwconv1)

    def forward(self, x):
        return self.pw.plus(x, _then(self.dw, self.act, x))


def _then(conv, act, x):
    return conv.then(act, x) if isinstance(conv, Conv2dT) else act(conv(x))


class Res2d(nn.Module):
    def __init__(self, blk):
        super().__init__()
        self.conv1, self.conv1pw = _conv2d(blk.conv1), _conv2d(blk.conv1pw)
        scale, shift = _bn_scale_shift(blk.bn1)
        self.bn1_scale = _param(scale.view(1, -1, 1, 1))
        self.bn1_shift = _param(shift.view(1, -1, 1, 1))
        self.conv2 = _conv2d(blk.conv2)
        self.conv2pw = _conv2d(blk.conv2pw, *_bn_scale_shift(blk.bn2))
        self.se = None
        if isinstance(blk.se, B.FwSE):
            self.se = blk.se

    def forward(self, x):  # (B, C, T, F) channels-last
        y = torch.addcmul(self.bn1_shift, torch.relu(self.conv1pw(self.conv1(x))), self.bn1_scale)
        if self.se is None:
            return torch.relu(self.conv2pw.plus(x, self.conv2(y)))
        y = self.conv2pw(self.conv2(y))
        g = torch.sigmoid(self.se.exitation(torch.relu(self.se.squeeze(y.mean(dim=(1, 2))))))  # (B, F)
        return torch.relu(x + y * g[:, None, None, :])


class Squeeze2d(nn.Module):
    """The conv_exp squeeze: grouped 3x3 conv + BN (folded) -> act -> 1x1 conv."""

    def __init__(self, seq):
        super().__init__()
        conv, bn, act, pw = seq
        self.conv, self.act, self.pw = _conv2d(conv, *_bn_scale_shift(bn)), act, _conv2d(pw)

    def forward(self, x):
        return self.pw(_then(self.conv, self.act, x))


class ConvNeXt1d(nn.Module):
    def __init__(self, blk):
        super().__init__()
        self.dw = DepthwiseTime(list(blk.dwconvs), *_bn_scale_shift(blk.norm))
        self.act = blk.act
        self.pw = Linear1x1(blk.pwconv1)

    def forward(self, x):  # (B, T, C)
        return self.pw.plus(x, self.act(self.dw(x)))


class PosEnc1d(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.dw, self.norm = DepthwiseTime([m.conv]), LayerNormLast(m.norm)

    def forward(self, x):
        return x + self.norm(self.dw(x))


class Transformer1d(nn.Module):
    """TransformerLayer without its transposes: (B, T, C) in and out."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        x = m.layer_norm(x + m.attention(x))
        return m.final_layer_norm(x + m.feed_forward(x))


def _convert_1d(m):
    if isinstance(m, B.ConvNeXtBlock):
        return ConvNeXt1d(m)
    if isinstance(m, B.PosEncConv):
        return PosEnc1d(m)
    if isinstance(m, B.TransformerLayer):
        return Transformer1d(m)
    if isinstance(m, nn.Conv1d) and m.kernel_size == (1,):
        return Linear1x1(m)
    if isinstance(m, B.LayerNormCF):
        return LayerNormLast(m)
    if isinstance(m, (nn.GELU, nn.ReLU)):
        return m
    raise B.ConfigError(f"{type(m).__name__} is not supported by the inference copy")


class TimeContext1d(nn.Module):
    def __init__(self, blk):
        super().__init__()
        conv, ln = blk.red_dim_conv
        self.red = nn.Sequential(Linear1x1(conv), LayerNormLast(ln))
        self.tcm = nn.Sequential(*[_convert_1d(m) for m in blk.tcm])
        self.exp = Linear1x1(blk.exp_dim_conv)

    def forward(self, x):  # (B, T, F*C)
        return self.exp.plus(x, self.tcm(self.red(x)))


def _convert_2d(m):
    if isinstance(m, B.Block2d):
        m = m.conv_block
    if isinstance(m, B.ConvNeXtBlock):
        return ConvNeXt2d(m)
    if isinstance(m, B.ResBlock):
        return Res2d(m)
    if isinstance(m, nn.Sequential):
        return Squeeze2d(m)
    if isinstance(m, nn.Conv2d):
        return _conv2d(m)
    raise B.ConfigError(f"{type(m).__name__} is not supported by the inference copy")


def _weights(ws):
    """WeightedSum's softmax weights as (N, 1, 1, D or 1) for (B, T, D) tensors."""
    w = torch.softmax(ws.w.detach(), dim=1)[0, :, :, 0]  # (N, D or 1)
    return [_param(w[i].view(1, 1, -1)) for i in range(w.shape[0])]


def _weighted_sum(ws, xs):
    out = ws[0] * xs[0]
    for w, x in zip(ws[1:], xs[1:]):
        out.addcmul_(w, x)  # in place: out is this function's own tensor
    return out


class Stage(nn.Module):
    """WeightedSum -> to 2-D -> frequency-stride conv -> 2-D blocks -> to 1-D -> time context."""

    def __init__(self, stage):
        super().__init__()
        ws, to2d, *rest = list(stage)
        self.ws = nn.ParameterList(_weights(ws))
        self.f, self.c = to2d.f, to2d.c
        layers2d, self.tcb = [], None
        for m in rest:
            if isinstance(m, B.To1d):
                continue
            if isinstance(m, B.TimeContextBlock):
                self.tcb = TimeContext1d(m)
            else:
                layers2d.append(_convert_2d(m))
        self.layers2d = nn.Sequential(*layers2d)

    def forward(self, outs):  # list of (B, T, F*C) -> (B, T, F*C)
        x = _weighted_sum(list(self.ws), outs)
        b, t, _ = x.shape
        x = x.view(b, t, self.f, self.c).permute(0, 3, 1, 2)  # (B, c, T, f) channels-last: a view
        x = self.layers2d(x)
        x = x.permute(0, 2, 3, 1).reshape(b, t, -1)  # back to (B, T, F*C): a view when channels-last
        return self.tcb(x) if self.tcb is not None else x


class InferenceBackbone(nn.Module):
    """Backbone in the time-major layout: log-mel (B, F, T) -> frames (B, T, D)."""

    def __init__(self, bb):
        super().__init__()
        conv, ln, _to1d = bb.stem
        self.stem_conv, self.stem_norm = Conv2dT(conv), LayerNormLast(ln)
        self.stages = nn.ModuleList(Stage(getattr(bb, name)) for name in bb.stage_names)
        self.ws = nn.ParameterList(_weights(bb.fin_wght1d))
        self.mfa = None
        if isinstance(bb.mfa, nn.Sequential):
            self.mfa = Linear1x1(bb.mfa[0], *_bn_scale_shift(bb.mfa[1]))

    def forward(self, mel):  # (B, F, T) -> (B, T, D)
        b, f, t = mel.shape
        x = mel.transpose(1, 2).reshape(b, 1, t, f).contiguous(memory_format=CL)  # (B, 1, T, F)
        x = self.stem_conv(x).permute(0, 2, 3, 1)  # (B, T, F, C)
        outs = [self.stem_norm(x).reshape(b, t, -1)]
        for stage in self.stages:
            outs.append(stage(outs))
        x = _weighted_sum(list(self.ws), outs)
        return self.mfa(x) if self.mfa is not None else x


class InferencePool(nn.Module):
    """ASTP on (B, T, D) -> (B, 2D); the global-context concat written as split matmuls."""

    def __init__(self, pool):
        super().__init__()
        self.global_context_att = pool.global_context_att
        w1, self.b1 = _param(pool.linear1.weight[:, :, 0]), _param(pool.linear1.bias)
        d = pool.linear2.weight.shape[0]
        if self.global_context_att:  # [x, mean, std] @ W1 = x @ Wx + (mean @ Wm + std @ Ws)
            self.w1x, self.w1m, self.w1s = (_param(w1[:, i * d:(i + 1) * d]) for i in range(3))
        else:
            self.w1x = _param(w1)
        self.w2, self.b2 = _param(pool.linear2.weight[:, :, 0]), _param(pool.linear2.bias)

    def forward(self, x):  # (B, T, D)
        h = F.linear(x, self.w1x, self.b1)
        if self.global_context_att:
            mean = x.mean(dim=1)  # (B, D)
            dev = x - mean[:, None, :]  # two passes: var over the middle axis ran 5x slower
            std = torch.sqrt(dev.pow_(2).sum(dim=1) / (x.shape[1] - 1) + 1e-7)
            h = h + (F.linear(mean, self.w1m) + F.linear(std, self.w1s))[:, None, :]
        alpha = torch.softmax(F.linear(torch.tanh(h), self.w2, self.b2), dim=1)  # (B, T, D)
        mean = (alpha * x).sum(dim=1)
        var = (alpha * x.pow(2)).sum(dim=1) - mean.pow(2)
        return torch.cat([mean, torch.sqrt(var.clamp(min=1e-7))], dim=1)


class InferenceReDimNet(nn.Module):
    """Frozen inference copy of a ReDimNet (see the module docstring); eval mode only.

    Reads like ReDimNet: ``features``, ``frames``, ``pooled``, ``head``, ``forward``, and the
    attributes ``model_config``, ``pooled_dim``, ``embed_dim``, ``weights_sha256``.
    """

    def __init__(self, model):
        super().__init__()
        if model.training:
            raise ValueError("for_inference needs an eval-mode model (BatchNorm uses its running statistics)")
        model = copy.deepcopy(model)  # the copy shares no module with the model it came from
        self.model_config = model.model_config
        self.pooled_dim, self.embed_dim = model.pooled_dim, model.embed_dim
        self.weights_sha256, self.min_samples = model.weights_sha256, model.min_samples
        self.spec = model.spec
        with torch.no_grad():
            self.net = InferenceBackbone(model.backbone)
            self.pool = InferencePool(model.pool)
            scale, shift = _bn_scale_shift(model.bn)  # head: linear(bn(p)) as one linear
            self.head_w = _param(model.linear.weight * scale[None, :])
            self.head_b = _param(model.linear.bias + model.linear.weight @ shift)
        self.bn2 = model.bn2
        self.eval()
        self.requires_grad_(False)

    def train(self, mode=True):
        if mode:
            raise ValueError("an inference copy cannot train: BatchNorm is folded into its convolutions")
        return super().train(False)

    def features(self, wave):
        return self.spec(wave)

    def frames(self, wave):
        """Waveform -> backbone frames (B, D, T'), as ReDimNet.frames (a transposed view)."""
        return self.net(self.features(wave)).transpose(1, 2)

    def pooled(self, wave):
        return self.pool(self.net(self.features(wave)))

    def head(self, pooled):
        x = F.linear(pooled, self.head_w, self.head_b)
        return self.bn2(x) if self.bn2 is not None else x

    def forward(self, wave):
        return self.head(self.pooled(wave))
