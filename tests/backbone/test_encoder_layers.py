"""The ``layers`` stream of ECAPA-TDNN and CAM++ on their real published weights.

The layers must be the network's own intermediate outputs: forward hooks on the blocks,
filled by the model's one-pass ``pooled``, record them independently, and finishing the
forward from the layers (``pooled_from_layers``, then the embedding layer) must give the
one-pass pooled vector bit for bit, and the reference code's embedding (``ref.pt``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_encoders import CAMPPLUS, CAMPPLUS_FILE, ECAPA, FIXTURES, TOL, rel

from mrlcache import load_model, streams
from mrlcache.backbone import campplus as campplus_module
from mrlcache.backbone import ecapa_tdnn, load_backbone
from mrlcache.cli import main
from mrlcache.streams import windows
from mrlcache.streams.grid import kaldi_frames

pytestmark = [pytest.mark.skipif(not FIXTURES.is_dir(), reason="needs ../shared/fixtures/encoders"),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def ecapa():
    return load_backbone(str(ECAPA))


@pytest.fixture(scope="module")
def campplus():
    return load_backbone(str(CAMPPLUS_FILE))


def hooked(model, modules, wave):
    """(pooled, [outputs of ``modules``]) recorded by forward hooks during ``model.pooled(wave)``."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o)) for m in modules]
    try:
        with torch.no_grad():
            pooled = model.pooled(wave)
    finally:
        for h in hooks:
            h.remove()
    return pooled, seen


def test_ecapa_layers_are_its_block_outputs(ecapa):
    ref = torch.load(ECAPA / "ref.pt", weights_only=True)
    for name, case in ref.items():
        wave = case["input"]
        pooled, seen = hooked(ecapa, list(ecapa.blocks), wave)
        with torch.no_grad():
            outs = ecapa.layer_outputs(wave)
            again = ecapa.pooled_from_layers(outs)
        frames = wave.shape[-1] // 160 + 1
        assert [tuple(o.shape) for o in outs] == [(wave.shape[0], 1024, frames)] * 4, name
        assert len(seen) == 4 and all(torch.equal(a, b) for a, b in zip(outs, seen)), name
        assert torch.equal(again, pooled), name  # finishing the forward from the layers is exact
        assert rel(again, case["pooled"]) < TOL and rel(ecapa.head(again), case["embedding"]) < TOL, name

    wave = ref["single"]["input"]
    stack = streams.compute("layers", wave, ecapa)
    assert stack.shape == (1, *streams.item_shape("layers", ecapa), streams.num_frames("layers", wave.shape[-1], ecapa))
    assert streams.item_shape("layers", ecapa) == (4, 1024) and streams.frame_rate("layers", ecapa) == 100.0
    stats = streams.compute("layers", wave, ecapa, layers_pooled=True)
    std, mean = torch.std_mean(stack, dim=-1, unbiased=False)
    assert stats.shape == (1, 4, 2048) and torch.allclose(stats, torch.cat([mean, std], -1), atol=1e-5)


def test_campplus_layers_are_its_last_two_transitions(campplus):
    ref = torch.load(CAMPPLUS / "ref.pt", weights_only=True)
    for name, case in ref.items():
        wave = case["input"]
        pooled, seen = hooked(campplus, [campplus.xvector.transit2, campplus.xvector.transit3], wave)
        with torch.no_grad():
            outs = campplus.layer_outputs(wave)
            again = campplus.pooled_from_layers(outs)
        frames = (kaldi_frames(wave.shape[-1]) + 1) // 2  # the strided TDNN halves the Kaldi grid
        assert [tuple(o.shape) for o in outs] == [(wave.shape[0], 512, frames)] * 2, name
        assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(outs, seen)), name
        assert torch.equal(again, pooled), name
        assert rel(again, case["pooled"]) < TOL and rel(campplus.head(again), case["embedding"]) < TOL, name
        assert streams.num_frames("layers", wave.shape[-1], campplus) == frames
    assert streams.item_shape("layers", campplus) == (2, 512) and streams.frame_rate("layers", campplus) == 50.0


def test_whole_utterances_longer_than_the_window(ecapa, campplus):
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 40000)).astype(np.float32) * 0.1)
    # ECAPA-TDNN's frames are centred every 10 ms: windows concatenate to the one-pass grid.
    with torch.no_grad():
        frames, pooled = windows.layers(ecapa, wave, 1.0, stats=False, with_pooled=True)
        one = torch.stack(ecapa.layer_outputs(wave), dim=1)
        first = torch.stack(ecapa.layer_outputs(wave[..., :windows.window_bounds(40000, 1.0, 160)[0][1]]), dim=1)
    assert frames.shape == one.shape
    assert torch.equal(frames[..., :first.shape[-1] - 1], first[..., :-1])  # window 1's frames, as computed alone
    torch.testing.assert_close(pooled, windows.pooled(ecapa, wave, 1.0))
    # CAM++'s are not (snip-edge Kaldi frames, then a stride of 2): its layers take one pass,
    # and the pooled vector beside them is the windowed one, as without layers.
    with torch.no_grad():
        frames, pooled = windows.layers(campplus, wave, 1.0, stats=False, with_pooled=True)
        assert torch.equal(frames, torch.stack(campplus.layer_outputs(wave), dim=1))
        assert torch.equal(pooled, windows.pooled(campplus, wave, 1.0))


def test_block_outputs_of_several_widths_are_refused_in_one_line(tmp_path):
    tiny = campplus_module.build({"growth_rate": 8, "bn_size": 2, "init_channels": 16, "embedding_size": 24})
    with pytest.raises(streams.StreamError, match="stacks campplus's block outputs, which needs one width; "
                                                  "this configuration has \\[124, 126\\]"):
        streams.item_shape("layers", tiny)
    tiny = ecapa_tdnn.build({"channels": [16, 32, 32, 32, 96], "attention_channels": 8, "res2net_scale": 4,
                             "se_channels": 8, "lin_neurons": 8})
    with pytest.raises(streams.StreamError, match="needs one width"):
        streams.item_shape("layers", tiny)
