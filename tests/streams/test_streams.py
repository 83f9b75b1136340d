"""Streams registry: shapes, dtypes, frame rates, Kaldi references, ReDimNet internals, PTMs."""

import urllib.error

import numpy as np
import pytest
import torch
import torchaudio
from torchaudio.compliance import kaldi

from conftest import speech_like
from mrlcache import streams
from mrlcache.backbone import load_backbone
from mrlcache.streams import ptm as ptm_module


def _waves(seconds=2.0, n=2):
    return torch.from_numpy(np.stack([speech_like(seconds, seed=s, f0=110.0 + 40 * s) for s in range(n)]))


@pytest.fixture(scope="module")
def b0():
    return load_backbone("b0", random_init=True, seed=3)


def test_fbank_and_mfcc_equal_torchaudio_reference():
    waves = _waves()
    fb, mf = streams.compute("fbank", waves), streams.compute("mfcc", waves)
    for i, w in enumerate(waves):
        ref_fb = kaldi.fbank(w[None], num_mel_bins=80, frame_length=25.0, frame_shift=10.0,
                             dither=0.0, sample_frequency=16000)
        ref_mf = kaldi.mfcc(w[None], num_ceps=40, num_mel_bins=40, frame_length=25.0, frame_shift=10.0,
                            dither=0.0, sample_frequency=16000)
        assert torch.equal(fb[i], ref_fb.T)
        assert torch.equal(mf[i], ref_mf.T)
    assert fb.shape == (2, 80, 198) and mf.shape == (2, 40, 198)
    assert fb.dtype == mf.dtype == torch.float32


@pytest.mark.parametrize("name", ["fbank", "mfcc", "f0"])
def test_handcrafted_frame_rate_and_stored_dtype(name):
    for seconds in (1.0, 3.0):
        out = streams.compute(name, _waves(seconds, 1))
        assert out.shape[1:-1] == streams.item_shape(name)
        # 25 ms windows every 10 ms: 100 frames per second minus the last 1.5 frames.
        assert out.shape[-1] == streams.num_frames(name, int(seconds * 16000)) == int(seconds * 100) - 2
    assert streams.frame_rate(name) == 100.0
    assert streams.spec(name).dtype == "float16"
    assert streams.compute_one(name, _waves(1.0, 1)[0]).shape == out.shape[1:-1] + (98,)


def test_unknown_stream_and_parse():
    assert streams.parse_streams("pooled, layers,f0") == ("pooled", "layers", "f0")
    with pytest.raises(streams.StreamError, match="unknown stream 'pitch'.*pooled, layers"):
        streams.parse_streams("pooled,pitch")
    with pytest.raises(streams.StreamError, match="twice"):
        streams.parse_streams("fbank,fbank")
    with pytest.raises(streams.StreamError, match="needs a backbone"):
        streams.compute("layers", _waves(1.0, 1))


@pytest.mark.slow
def test_layers_are_the_redimnet_internals(b0):
    waves = _waves(1.5)
    # Independent record of the internals: forward hooks on the stem and on the last
    # module of every stage, filled by the model's own forward.
    seen = []
    hooks = [b0.backbone.stem.register_forward_hook(lambda m, i, o: seen.append(o))]
    for name in b0.backbone.stage_names:
        hooks.append(getattr(b0.backbone, name)[-1].register_forward_hook(lambda m, i, o: seen.append(o)))
    with torch.no_grad():
        pooled = b0.pooled(waves)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        outs = b0.layer_outputs(waves)
        again = b0.pooled_from_layers(outs)
    assert len(outs) == len(seen) == 1 + len(b0.backbone.stage_names)
    for a, b in zip(outs, seen):
        assert torch.equal(a, b)
    assert torch.equal(again, pooled)  # finishing the forward from the layers is exact

    frames = streams.compute("layers", waves, b0)
    cfg = b0.model_config
    assert frames.shape == (2, len(outs), cfg["F"] * cfg["C"], 1.5 * 16000 // 160 + 1)
    assert streams.frame_rate("layers", b0) == 100.0
    assert streams.num_frames("layers", 24000, b0) == frames.shape[-1]
    stats = streams.compute("layers", waves, b0, layers_pooled=True)
    std, mean = torch.std_mean(frames, dim=-1, unbiased=False)
    assert stats.shape == (2, len(outs), 2 * cfg["F"] * cfg["C"]) == (2, *streams.item_shape("layers", b0, True))
    torch.testing.assert_close(stats, torch.cat([mean, std], dim=-1))
    assert torch.equal(streams.compute("pooled", waves, b0), pooled)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ptm_module.PTMS))
def test_ptm_hidden_states_random_init(name):
    model = streams.load_ptm(name, random_init=True, seed=1)
    assert model.source == "random-init"
    waves = _waves(1.0)
    states = streams.compute("layers", waves, model)
    assert states.shape == (2, 13, 768, (16000 - 400) // 320 + 1) == (2, *streams.item_shape("layers", model), 49)
    assert streams.frame_rate("layers", model) == 50.0 and streams.num_frames("layers", 16000, model) == 49
    with torch.no_grad():
        ref, _ = model.model.extract_features(waves)
    for i, r in enumerate(ref):  # states 1..12 are torchaudio's transformer outputs
        assert torch.equal(states[:, i + 1], r.transpose(1, 2))
    assert not torch.equal(states[:, 0], states[:, 1])
    with pytest.raises(streams.StreamError, match="needs an encoder with a pooled vector"):
        streams.compute("pooled", waves, model)


@pytest.mark.slow
def test_ptm_weights_file_round_trip_and_errors(tmp_path):
    model = streams.load_ptm("hubert-base", random_init=True, seed=2)
    path = tmp_path / "hubert.pt"
    torch.save(model.model.state_dict(), path)
    again = streams.load_ptm("hubert-base", weights=path)
    assert again.source == str(path.resolve())
    for a, b in zip(model.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(streams.PTMError, match="does not hold wavlm-base-plus weights"):
        streams.load_ptm("wavlm-base-plus", weights=path)
    with pytest.raises(streams.PTMError, match="no such file"):
        streams.load_ptm("hubert-base", weights=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(streams.PTMError, match="not a torch state_dict"):
        streams.load_ptm("hubert-base", weights=tmp_path / "junk.pt")


def test_ptm_offline_error_names_the_option(monkeypatch):
    def offline(self, *, dl_kwargs=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(torchaudio.pipelines.WAVLM_BASE_PLUS), "get_model", offline)
    with pytest.raises(streams.PTMError, match=r"wavlm_base_plus\.pth.*--ptm-weights PATH"):
        streams.load_ptm("wavlm-base-plus")
    with pytest.raises(streams.PTMError, match="unknown PTM 'wavlm'"):
        streams.load_ptm("wavlm", random_init=True)
    with pytest.raises(streams.PTMError, match="not both"):
        streams.load_ptm("hubert-base", random_init=True, weights="x.pt")
