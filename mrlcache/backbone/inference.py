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
``layer_norm`` over the last axis; grouped convolutions of 2 and 4 channels a group (and their
GELU) in mrlcache's own kernel (backbone/gconv.py), others widened to PACK channels a group;
residual + bias + 1x1 as one matmul into the block's input; the layers are in
:mod:`mrlcache.backbone.inference_layers`; BatchNorm folded into the convolution before it (a
BatchNorm after a ReLU, ResBlock.bn1, stays a scale and shift: folding it into the next
zero-padded convolution would change the borders).
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mrlcache.backbone import blocks as B
from mrlcache.backbone.inference_layers import (
    CL, Conv2dT, DepthwiseTime, LayerNormLast, Linear1x1, _bn_scale_shift, _conv2d, _param,
)


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
