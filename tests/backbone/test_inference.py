"""ReDimNet.for_inference: the fast frozen copy computes what the model computes, and changes nothing.

Pooled vectors are compared per row by relative error: their std half is E[x^2] - mean^2,
whose cancellation turns 1e-7 differences in the frames into absolute differences of about
1e-5 in small std entries (the model itself moves that much between 1 and 2 threads).
"""

import pytest
import torch
from conftest import TINY
from test_redimnet import FIXTURES, needs_fixtures

from mrlcache.backbone.loading import build_from_checkpoint, load_backbone, state_sha256
from mrlcache.backbone.redimnet import ReDimNet


def row_rel_err(a, b):
    return ((a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)).max().item()


def scrambled_norms(model, seed=0):
    """Random running statistics and affine weights in every BatchNorm, so folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(1 + torch.randn(n, generator=g) * 0.2)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def compare(model, wave):
    fast = model.for_inference()
    with torch.no_grad():
        frames, fast_frames = model.frames(wave), fast.frames(wave)
        pooled, fast_pooled = model.pooled(wave), fast.pooled(wave)
        emb, fast_emb = model(wave), fast(wave)
    assert fast_frames.shape == frames.shape and fast_pooled.shape == pooled.shape
    assert (fast_frames - frames).abs().max().item() < 1e-5
    assert row_rel_err(fast_pooled, pooled) < 1e-5
    assert (fast_emb - emb).abs().max().item() < 1e-5
    return fast_pooled


@pytest.mark.slow  # runs b2 on audio
@needs_fixtures
@pytest.mark.parametrize("inp", ["batch2", "single"])
def test_b2_inference_copy_matches_model_and_reference(inp):
    model = build_from_checkpoint(torch.load(FIXTURES / "b2.pt", weights_only=True), "b2.pt").eval()
    ref = torch.load(FIXTURES / "b2.ref.pt", weights_only=True)[inp]
    pooled = compare(model, ref["input"])
    assert row_rel_err(pooled, ref["pooled"]) < 1e-5  # and the authors' implementation


@pytest.mark.parametrize("name", ["b0", "b1", "b3"])
def test_random_variants_with_folded_norms_match(name):
    torch.manual_seed(0)
    model = scrambled_norms(load_backbone(name, random_init=True).eval())
    wave = torch.randn(2, 8000, generator=torch.Generator().manual_seed(1))
    compare(model, wave)


def test_tiny_config_with_every_block_kind_matches():
    torch.manual_seed(0)
    model = scrambled_norms(ReDimNet(dict(TINY, out_channels=24, emb_bn=True)).eval())
    compare(model, torch.randn(3, 4000, generator=torch.Generator().manual_seed(2)))


def test_model_state_and_hash_unchanged_and_copy_cannot_train():
    torch.manual_seed(0)
    model = ReDimNet(TINY).eval()
    before = state_sha256(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    fast = model.for_inference()
    with torch.no_grad():
        fast.pooled(torch.randn(1, 4000))
    assert state_sha256(model) == before
    assert [p.requires_grad for p in model.parameters()] == grads
    ReDimNet(TINY).load_state_dict(model.state_dict(), strict=True)  # still the published format
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert fast.weights_sha256 == model.weights_sha256 and fast.pooled_dim == model.pooled_dim
    with pytest.raises(ValueError, match="cannot train"):
        fast.train()
    with pytest.raises(ValueError, match="eval-mode"):
        model.train().for_inference()


@pytest.mark.parametrize("channels,groups", [(16, 4), (32, 8), (24, 12), (8, 8), (12, 3)])
def test_grouped_conv_packed_into_wider_groups_computes_the_same(channels, groups):
    """A grouped 3x3 convolution with narrow groups, merged into block-diagonal groups of PACK
    channels, gives the original convolution's output; groups it cannot merge are kept."""
    from mrlcache.backbone.inference_layers import PACK, Conv2dT

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=groups).eval()
    x = torch.randn(2, channels, 10, 7)  # (B, C, F, T) as the model holds it
    copy = Conv2dT(conv)
    per = channels // groups
    merged = 1 < per < PACK and PACK % per == 0 and channels % PACK == 0  # depthwise stays
    assert copy.groups == (channels // PACK if merged else groups)
    with torch.no_grad():
        got = copy(x.transpose(2, 3).contiguous(memory_format=torch.channels_last)).transpose(2, 3)
        want = conv(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
