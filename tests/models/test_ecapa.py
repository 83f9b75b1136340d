"""ECAPA-TDNN head: shapes, nested Matryoshka output, learning on a separable problem."""

import pytest
import torch
from torch import nn

from heads_synthetic import WIDTHS, check_learns

from mrlcache.models import ecapa, fusion

TINY = dict(channels=16, scale=4, mfa_channels=32, attention_bottleneck=8, se_bottleneck=8)


def test_shapes_and_prefix_nesting():
    head = ecapa.ECAPATDNN(82, dims=(8, 16, 24), **TINY).eval()
    x = torch.randn(3, 82, 50)
    assert head.pooled(x).shape == (3, 64)
    emb = head(x)
    assert emb.shape == (3, 24) and head.dims == (8, 16, 24)
    assert len(head.blocks) == 4  # four SE-Res2 blocks by default
    # One linear map: the 8-D embedding is the first 8 outputs of the 24-D one.
    w = head.embedding.linear.weight[:8]
    bn = head.embedding.bn
    manual = (head.pooled(x) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(emb[:, :8], manual @ w.T + head.embedding.linear.bias[:8])
    fixed = dict(TINY, mfa_channels=256)  # a 512-D embedding from 512 pooled statistics
    assert ecapa.ECAPATDNN(40, dims=(512,), **fixed).eval()(torch.randn(2, 40, 20)).shape == (2, 512)


def test_bad_input_and_widths():
    head = ecapa.ECAPATDNN(82, dims=(8,), **TINY)
    with pytest.raises(ValueError, match=r"\(B, 82, T\)"):
        head(torch.randn(2, 80, 50))
    with pytest.raises(ValueError, match="divisible by the Res2 scale"):
        ecapa.ECAPATDNN(82, dims=(8,), channels=18, scale=4)


def test_attentive_pooling_of_constant_frames_is_mean_and_zero_std():
    pool = ecapa.AttentiveStatsPool(4, bottleneck=3).eval()
    x = torch.arange(4.0).view(1, 4, 1).expand(2, 4, 9)
    out = pool(x)
    torch.testing.assert_close(out[:, :4], x[:, :, 0])
    assert torch.all(out[:, 4:] < 1e-2)


class FrameModel(nn.Module):
    """streams -> (gating fusion of CNN-encoded streams | first stream) -> ECAPA."""

    def __init__(self, dims, fused):
        super().__init__()
        width = 16
        self.fused = fused
        if fused:
            self.encoders = nn.ModuleList(fusion.CNN1dEncoder(w, width, hidden=16, num_layers=2) for w in WIDTHS)
            self.fusion = fusion.GatingFusion([width] * len(WIDTHS), width)
        self.head = ecapa.ECAPATDNN(width if fused else WIDTHS[0], dims=dims, **TINY)

    def forward(self, streams):
        if self.fused:
            return self.head(self.fusion([e(x) for e, x in zip(self.encoders, streams)]))
        return self.head(streams[0])


@pytest.mark.parametrize("fused", [False, True])
def test_ecapa_trains_and_beats_raw_cosine(fused):
    torch.manual_seed(0)
    check_learns(FrameModel((8, 16), fused), dims=(8, 16), ratio=0.75)
