"""model.pt for every head: stream models (ECAPA, fusions) rebuilt by load_model, on cached streams and audio."""

import numpy as np
import pytest
import torch
from conftest import speech_like

from mrlcache import load_model, streams
from mrlcache.fit.heads.streams import StreamModel, plan_groups
from mrlcache.model import ModelError, save_model

ECAPA = dict(channels=16, scale=4, mfa_channels=32, attention_bottleneck=8, se_bottleneck=8)
HANDCRAFTED = {"fbank": {"kind": "frames", "shape": (80,)}, "f0": {"kind": "frames", "shape": (2,)},
               "mfcc": {"kind": "frames", "shape": (40,)}}


def _trained_looking(model: StreamModel) -> StreamModel:
    """Weights and BatchNorm statistics away from their initial values, so a lost tensor shows."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=g)
            elif name.endswith("running_mean"):
                b.normal_(0.0, 0.3, generator=g)
    return model.eval()


def _waves(n=2, seconds=0.6):
    return torch.from_numpy(np.stack([speech_like(seconds, seed=i, f0=100.0 + 20 * i) for i in range(n)]))


def test_ecapa_on_handcrafted_round_trips_and_embeds_audio(tmp_path):
    torch.manual_seed(0)
    model = _trained_looking(StreamModel(plan_groups(["fbank", "f0"], HANDCRAFTED), "ecapa",
                                         dict(ECAPA, dims=[8, 16])))
    path = save_model(tmp_path / "model.pt", model)
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert raw["head"]["name"] == "streams" and raw["inputs"] == ["fbank", "f0"]
    loaded = load_model(path)
    assert loaded.inputs == ("fbank", "f0") and loaded.dims == (8, 16)
    waves = _waves()
    # From audio: the streams computed by the registry as extract computes them.
    batch = {s: streams.compute(s, waves) for s in ("fbank", "f0")}
    with torch.no_grad():
        expected = model(batch).numpy()
    np.testing.assert_array_equal(loaded.project({k: v.numpy() for k, v in batch.items()}), expected)
    np.testing.assert_allclose(loaded(waves.numpy()), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loaded.embed_all(waves.numpy())[8], expected[:, :8], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "cross-attention", "gating"])
def test_fusion_models_round_trip_with_identical_embeddings(tmp_path, fusion):
    info = {"layers": {"kind": "frames", "shape": (3, 8)}, **HANDCRAFTED}
    torch.manual_seed(1)
    model = _trained_looking(StreamModel(plan_groups(["layers", "mfcc", "f0"], info), "mrl", {"dims": [4, 8]},
                                         fusion=fusion, encoder_dim=16))
    loaded = load_model(save_model(tmp_path / "model.pt", model))
    assert loaded.head.spec() == model.spec()
    g = torch.Generator().manual_seed(2)
    f0 = 100 + 20 * torch.rand(5, 1, 30, generator=g)
    f0 = torch.cat([torch.where(torch.rand(5, 1, 30, generator=g) > 0.3, f0, torch.nan),
                    torch.rand(5, 1, 30, generator=g)], dim=1)
    batch = {"layers": torch.randn(5, 3, 8, 31, generator=g), "mfcc": torch.randn(5, 40, 30, generator=g), "f0": f0}
    with torch.no_grad():
        expected = model(batch).numpy()
    np.testing.assert_array_equal(loaded.project({k: v.numpy() for k, v in batch.items()}), expected)
    # A model on layers saved without a backbone cannot compute them from audio: said so.
    with pytest.raises(ModelError, match="layers.*backbone"):
        loaded(_waves(1).numpy())


@pytest.mark.slow  # runs a ReDimNet on audio
def test_layers_model_embeds_audio_through_the_saved_backbone(tmp_path):
    from mrlcache.backbone import BackboneRecord, load_backbone, state_sha256
    from mrlcache.streams.layers import redimnet_layer_dim, redimnet_layers, redimnet_num_layers

    backbone = load_backbone("b0", random_init=True, seed=3).eval()
    info = {"layers": {"kind": "frames", "shape": (redimnet_num_layers(backbone), redimnet_layer_dim(backbone))},
            **HANDCRAFTED}
    torch.manual_seed(2)
    model = _trained_looking(StreamModel(plan_groups(["layers", "fbank"], info), "ecapa", dict(ECAPA, dims=[8]),
                                         fusion="gating", encoder_dim=16))
    record = BackboneRecord.random_init("b0", state_sha256(backbone))
    loaded = load_model(save_model(tmp_path / "model.pt", model, backbone=backbone, backbone_ref=record))
    waves = _waves(2, 0.5)
    with torch.no_grad():
        batch = {"layers": torch.stack(redimnet_layers(backbone, waves), dim=1),
                 "fbank": streams.compute("fbank", waves)}
        expected = model(batch).numpy()
    np.testing.assert_allclose(loaded(waves.numpy()), expected, rtol=1e-5, atol=1e-5)


def test_project_refusals_name_the_streams(tmp_path):
    torch.manual_seed(0)
    model = StreamModel(plan_groups(["fbank", "f0"], HANDCRAFTED), "ecapa", dict(ECAPA, dims=[8])).eval()
    loaded = load_model(save_model(tmp_path / "model.pt", model))
    with pytest.raises(ModelError, match="missing f0"):
        loaded.project({"fbank": np.zeros((2, 80, 20), np.float32)})
    with pytest.raises(ModelError, match="reads streams fbank, f0"):
        loaded.project(np.zeros((2, 80), np.float32))


def test_unknown_head_in_a_model_file_is_refused(tmp_path):
    torch.manual_seed(0)
    model = StreamModel(plan_groups(["fbank"], HANDCRAFTED), "mrl", {"dims": [8]}, encoder_dim=8)
    path = save_model(tmp_path / "model.pt", model)
    obj = torch.load(path, weights_only=True)
    obj["head"]["name"] = "conformer"
    torch.save(obj, path)
    with pytest.raises(ModelError, match="head 'conformer' is not known"):
        load_model(path)
