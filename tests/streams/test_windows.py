"""Long utterances window by window: the windows, the combined statistics, every ReDimNet stream."""

import numpy as np
import pytest
import torch

from conftest import TINY, speech_like
from mrlcache import streams
from mrlcache.backbone import ReDimNet
from mrlcache.cli.options import WINDOW_DEFAULT
from mrlcache.streams import windows
from mrlcache.streams.layers import mean_std

HOP = 160


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ReDimNet(TINY).eval()


def _wave(seconds, seed=0):
    return torch.from_numpy(speech_like(seconds, seed=seed))[None]  # (1, T)


@pytest.mark.parametrize("samples,window", [(16000, 1.0), (16001, 1.0), (35_000, 1.0), (48_000, 1.0),
                                            (161_337, 2.5), (16000 * 601 + 7, 300.0)])
def test_windows_cover_the_utterance_in_near_equal_whole_hops(samples, window):
    bounds = windows.window_bounds(samples, window, HOP)
    limit = int(window * 16000)
    assert bounds[0][0] == 0 and bounds[-1][1] == samples
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap
    assert len(bounds) == -(-samples // limit)
    lengths = [b - a for a, b in bounds]
    assert all(n % HOP == 0 for n in lengths[:-1])
    assert max(lengths) <= limit + HOP
    assert max(lengths) - min(lengths) <= 2 * HOP  # one hop of rounding, plus the remainder


def test_short_utterances_and_no_window_are_one_pass():
    assert windows.window_bounds(16000, 1.0, HOP) == [(0, 16000)]
    assert windows.window_bounds(10 ** 9, None, HOP) == [(0, 10 ** 9)]


def test_combined_statistics_equal_those_of_all_frames():
    gen = torch.Generator().manual_seed(1)
    frames = torch.randn(3, 5, 1000, generator=gen) * 4 + 2  # (B, D, T), far from zero mean
    cuts = [0, 137, 512, 1000]
    parts = [frames[..., a:b] for a, b in zip(cuts, cuts[1:])]

    def stats(x):
        return torch.cat([x.mean(-1), x.var(-1, unbiased=False).sqrt()], dim=-1)

    combined = windows.combine_stats([stats(p) for p in parts], [p.shape[-1] for p in parts], floor=0.0)
    torch.testing.assert_close(combined, stats(frames), rtol=1e-5, atol=1e-5)


def test_every_command_windows_at_the_library_default():
    from mrlcache.cli import main

    for name in ("extract", "eer", "embed", "verify"):
        option = next(p for p in main.commands[name].params if p.name == "window_seconds")
        assert option.default == windows.WINDOW_SECONDS == WINDOW_DEFAULT, name


def test_pooled_fits_in_one_window_is_bit_identical(tiny):
    wave = _wave(2.0)
    with torch.no_grad():
        assert torch.equal(windows.pooled(tiny, wave, 2.0), tiny.pooled(wave))
        assert torch.equal(streams.compute("pooled", wave, tiny, window_seconds=5.0), tiny.pooled(wave))


def test_long_pooled_never_runs_the_backbone_on_more_than_a_window(tiny):
    wave = _wave(5.3)
    seen = []
    hook = tiny.spec.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    try:
        with torch.no_grad():
            out = windows.pooled(tiny, wave, 1.5)
    finally:
        hook.remove()
    assert len(seen) == 4 and max(seen) <= 1.5 * 16000 + HOP and sum(seen) == wave.shape[-1]
    with torch.no_grad():
        whole = tiny.pooled(wave)
    assert out.shape == whole.shape and torch.isfinite(out).all()
    assert not torch.equal(out, whole)  # windows are not one pass: the combination is visible
    # The same speaker's statistics: far closer to the whole pass than another voice is.
    with torch.no_grad():
        other = tiny.pooled(_wave(5.3, seed=9) * 0.3)
    cos = torch.nn.functional.cosine_similarity
    assert cos(out, whole).item() > cos(other, whole).item()


def test_layers_frames_line_up_with_one_pass(tiny):
    wave = _wave(3.4)
    with torch.no_grad():
        frames, pooled = windows.layers(tiny, wave, 1.0, stats=False, with_pooled=True)
        whole = torch.stack(tiny.layer_outputs(wave), dim=1)
        first = torch.stack(tiny.layer_outputs(wave[..., :windows.window_bounds(wave.shape[-1], 1.0, HOP)[0][1]]),
                            dim=1)
        stats, _ = windows.layers(tiny, wave, 1.0, stats=True)
        alone = windows.pooled(tiny, wave, 1.0)
    assert frames.shape == whole.shape  # T // hop + 1 frames, as for one pass
    n = first.shape[-1] - 1
    assert torch.equal(frames[..., :n], first[..., :n])  # window 0 is an ordinary pass, its last frame dropped
    torch.testing.assert_close(stats, mean_std(frames), rtol=1e-5, atol=1e-6)  # pooled layers: exact
    torch.testing.assert_close(pooled, alone, rtol=1e-6, atol=1e-7)  # pooled alike with or without layers
    via_registry = streams.compute("layers", wave, tiny, layers_pooled=True, window_seconds=1.0)
    torch.testing.assert_close(via_registry, stats, rtol=1e-6, atol=1e-7)


def test_model_embeds_long_waves_window_by_window(tmp_path, tiny):
    from mrlcache.models.matryoshka import MatryoshkaHead
    from mrlcache.models.model import MRLModel

    head = MatryoshkaHead(tiny.pooled_dim, (4, 8)).eval()
    model = MRLModel(tiny, head).eval()
    wave = _wave(2.6).numpy()
    model.window_seconds = 1.0
    windowed = model(wave, 8)
    model.window_seconds = None
    whole = model(wave, 8)
    with torch.no_grad():
        want = head(windows.pooled(tiny, torch.from_numpy(wave), 1.0))[:, :8].numpy()
    np.testing.assert_allclose(windowed, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(windowed, whole)
