"""Encoders and fusions: shapes, gates summing to one, and learning on a separable problem."""

import pytest
import torch
from torch import nn

from heads_synthetic import LENGTHS, WIDTHS, check_learns
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models import FUSIONS, fusion, fusion_class


class PooledModel(nn.Module):
    """streams -> per-stream CNN encoders -> fusion -> mean+std over time -> Matryoshka head."""

    def __init__(self, fusion_name, dims, width=32):
        super().__init__()
        self.encoders = nn.ModuleList(fusion.CNN1dEncoder(w, width, hidden=32, num_layers=2) for w in WIDTHS)
        self.fusion = fusion_class(fusion_name)([width] * len(WIDTHS), width)
        self.pool = fusion.MeanStdPool()
        self.head = MatryoshkaHead(2 * width, dims)

    def forward(self, streams):
        return self.head(self.pool(self.fusion([e(x) for e, x in zip(self.encoders, streams)])))


@pytest.mark.parametrize("name", list(FUSIONS))
def test_each_fusion_trains_and_beats_raw_cosine(name):
    torch.manual_seed(0)
    check_learns(PooledModel(name, dims=(8, 16)), dims=(8, 16))


def test_layer_weighted_sum_frames_and_pooled():
    enc = fusion.LayerWeightedSum(3, 5, out_dim=7)
    with torch.no_grad():
        enc.logits.copy_(torch.tensor([0.0, 1.0, 2.0]))
    w = enc.weights()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    x = torch.randn(2, 3, 5, 11)
    expected = enc.proj((w[0] * x[:, 0] + w[1] * x[:, 1] + w[2] * x[:, 2]).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(enc(x), expected)
    assert enc(x.mean(dim=3)).shape == (2, 7)  # per-layer pooled vectors
    assert fusion.LayerWeightedSum(3, 5)(x).shape == (2, 5, 11)
    with pytest.raises(ValueError, match=r"\(B, 3, D, T\)"):
        enc(torch.randn(2, 4, 5, 11))


def test_cnn_encoder_shape_and_nan_refused():
    enc = fusion.CNN1dEncoder(82)
    assert enc(torch.randn(2, 82, 30)).shape == (2, 768, 30)
    bad = torch.randn(2, 82, 30)
    bad[0, 80, 3] = float("nan")
    with pytest.raises(ValueError, match="f0_features"):
        enc(bad)


@pytest.mark.parametrize("per_frame", [True, False])
def test_gates_sum_to_one_and_are_read_out(per_frame):
    gate = fusion.GatingFusion([10, 6], 16, per_frame=per_frame)
    xs = [torch.randn(3, 10, LENGTHS[0]), torch.randn(3, 6, LENGTHS[1])]
    out, gates = gate(xs, return_gates=True)
    assert out.shape == (3, 16, LENGTHS[0])
    assert gates.shape == ((3, 2, LENGTHS[0]) if per_frame else (3, 2))
    torch.testing.assert_close(gates.sum(dim=1), torch.ones(gates.sum(dim=1).shape))
    assert torch.equal(gate.last_gates, gates.detach())
    # The fused frames are the gate-weighted sum of the projected streams.
    z = [gate.inputs[0](xs[0].transpose(1, 2)).transpose(1, 2),
         gate.inputs[1](fusion.match_length(xs[1], LENGTHS[0]).transpose(1, 2)).transpose(1, 2)]
    g = gates if per_frame else gates[:, :, None].expand(-1, -1, LENGTHS[0])
    torch.testing.assert_close(out, g[:, :1] * z[0] + g[:, 1:] * z[1])
    vec, vgates = gate([torch.randn(3, 10), torch.randn(3, 6)], return_gates=True)
    assert vec.shape == (3, 16) and vgates.shape == (3, 2)


def test_fusion_shapes_and_errors():
    xs = [torch.randn(2, 10, 40), torch.randn(2, 6, 38)]
    assert fusion.ConcatFusion([10, 6], 12)(xs).shape == (2, 12, 40)
    assert fusion.ConcatFusion([10, 6], 12)([x.mean(2) for x in xs]).shape == (2, 12)
    assert fusion.CrossAttentionFusion([10, 6], 16, heads=8)(xs).shape == (2, 16, 40)
    with pytest.raises(ValueError, match="divisible by 8 heads"):
        fusion.CrossAttentionFusion([10, 6], 12)
    with pytest.raises(ValueError, match="expected 6"):
        fusion.ConcatFusion([10, 6], 12)([xs[0], torch.randn(2, 5, 38)])
    with pytest.raises(ValueError, match="all be frames"):
        fusion.ConcatFusion([10, 6], 12)([xs[0], xs[1].mean(2)])
    assert fusion.match_length(xs[1], 40).shape == (2, 6, 40)
