"""The small-group 3x3 convolution kernel (backbone/gconv.c) against PyTorch's convolution."""

import pytest
import torch
import torch.nn.functional as F

from mrlcache.backbone import gconv
from mrlcache.backbone.inference_layers import Conv2dT

needs_kernel = pytest.mark.skipif(gconv.available() is not None, reason=f"kernel unavailable: {gconv.available()}")


@needs_kernel
@pytest.mark.parametrize("per", gconv.GROUPS)
@pytest.mark.parametrize("shape", [(2, 16, 11, 9), (1, 8, 1, 1), (3, 24, 5, 4), (1, 32, 7, 13)])
def test_kernel_equals_conv2d(per, shape):
    """Every output pixel, borders and the pixels after the last block of 4 included."""
    b, c, t, f = shape
    g = torch.Generator().manual_seed(c + t + f + per)
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    w, bias = torch.randn(c, per, 3, 3, generator=g), torch.randn(c, generator=g)
    want = F.conv2d(x, w, bias, padding=1, groups=c // per)
    got = gconv.conv3x3(x, gconv.pack(w), bias)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_result_does_not_depend_on_threads():
    """Each output is summed by one thread in a fixed order: bit-identical on 1 and 2 threads."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 9, 6, generator=g).contiguous(memory_format=torch.channels_last)
    packed, bias = gconv.pack(torch.randn(16, 4, 3, 3, generator=g)), torch.randn(16, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gconv.conv3x3(x, packed, bias)
        torch.set_num_threads(2)
        two = gconv.conv3x3(x, packed, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("groups,per", [(4, 4), (8, 2), (16, 1), (2, 8), (4, 3)])
def test_which_convolutions_the_kernel_takes(groups, per):
    conv = torch.nn.Conv2d(groups * per, groups * per, 3, padding=1, groups=groups)
    assert gconv.supports(conv) == (per in (2, 4) and groups * per % 8 == 0)
    assert not gconv.supports(torch.nn.Conv2d(16, 16, 3, padding=1, groups=4, stride=2))
    assert not gconv.supports(torch.nn.Conv2d(16, 16, 3, padding=0, groups=4))


@needs_kernel
def test_inference_conv_uses_the_kernel_and_matches_the_model():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 3, padding="same", groups=8).eval()
    copy = Conv2dT(conv)
    assert copy.kernel is not None
    x = torch.randn(2, 32, 10, 7)  # (B, C, F, T) as the model holds it
    with torch.no_grad():
        got = copy(x.transpose(2, 3).contiguous(memory_format=torch.channels_last)).transpose(2, 3)
        want = conv(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_without_a_compiler_the_copy_keeps_onednn_and_says_why(monkeypatch, tmp_path, capsys):
    """A machine where the kernel cannot be built: one warning naming why, the same outputs."""
    monkeypatch.setattr(gconv, "_STATE", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MRLCACHE_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.setattr(gconv, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(gconv.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr("mrlcache.runtime._WARNED", set())
    why = gconv.available()
    assert why is not None and "no-such-cc" in why
    assert "grouped-convolution kernel is not used" in capsys.readouterr().err
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4).eval()
    copy = Conv2dT(conv)
    assert copy.kernel is None
    x = torch.randn(1, 16, 6, 5)
    with torch.no_grad():
        got = copy(x.transpose(2, 3).contiguous(memory_format=torch.channels_last)).transpose(2, 3)
    torch.testing.assert_close(got, conv(x), rtol=1e-5, atol=1e-6)


def test_a_failed_build_is_named_and_leaves_no_file(monkeypatch, tmp_path):
    """A compiler that fails: the first line of its message, nothing left in the kernel folder."""
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc: fatal error: broken on purpose' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setattr(gconv, "_STATE", {})
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("MRLCACHE_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.setattr(gconv, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(gconv.platform, "machine", lambda: "x86_64")
    why = gconv.available()
    assert "broken on purpose" in why
    assert list((tmp_path / "engines" / "kernels").iterdir()) == []


@needs_kernel
@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0])
def test_kernel_gelu_equals_torch_gelu(scale):
    """GELU computed in the kernel's output loop: within float32 rounding of torch's exact GELU,
    from the far negative tail (where the kernel avoids 1 + erf's cancellation) to large x."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 16, 40, 9, generator=g) * scale).contiguous(memory_format=torch.channels_last)
    w, bias = torch.randn(16, 4, 3, 3, generator=g) / 6, torch.randn(16, generator=g) * scale
    packed = gconv.pack(w)
    conv = gconv.conv3x3(x, packed, bias)
    got = gconv.conv3x3(x, packed, bias, gelu=True)
    want = F.gelu(conv.double())
    assert ((got.double() - want).abs() / conv.double().abs().clamp(min=1)).max() < 3e-7
    sweep = torch.linspace(-12, 12, 8 * 1001).view(1, 8, 1001, 1).contiguous(memory_format=torch.channels_last)
    eye = torch.zeros(8, 4, 3, 3)
    eye[torch.arange(8), torch.arange(8) % 4, 1, 1] = 1.0  # each channel passes itself through
    got = gconv.conv3x3(sweep, gconv.pack(eye), torch.zeros(8), gelu=True)
    assert (got.double() - F.gelu(sweep.double())).abs().max() < 5e-7


@needs_kernel
def test_off_keeps_onednn_for_copies_made_inside_only():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4).eval()
    with gconv.off():
        assert Conv2dT(conv).kernel is None
    assert Conv2dT(conv).kernel is not None
