"""ECAPA-TDNN and CAM++ on their real published weights, against tensors their own code computed.

The weights and ``ref.pt`` are in ../shared/fixtures/encoders (see its README.md): for each
encoder two inputs with the reference fbank, mean-normalised features, pooled statistics and
embedding, computed by the speechbrain package and by 3D-Speaker's CAM++ code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from mrlcache.backbone import BackboneRecord, CheckpointError, load_backbone, save_checkpoint
from mrlcache.backbone.registry import BACKBONES, backbone_names, config_names

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "encoders"
ECAPA = FIXTURES / "ecapa-voxceleb"
CAMPPLUS = FIXTURES / "campplus-zh-en"
CAMPPLUS_FILE = CAMPPLUS / "campplus_cn_en_common.pt"
TOL = 1e-5

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="needs ../shared/fixtures/encoders")


def rel(a, b):
    """Largest per-row relative error ||a - b|| / ||b||."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.fixture(scope="module")
def ecapa():
    return load_backbone(str(ECAPA))


@pytest.fixture(scope="module")
def campplus():
    return load_backbone(str(CAMPPLUS_FILE))


@pytest.mark.parametrize("which", ["ecapa", "campplus"])
def test_front_end_pooled_and_embedding_equal_the_reference_code(which, request):
    model = request.getfixturevalue(which)
    ref = torch.load((ECAPA if which == "ecapa" else CAMPPLUS) / "ref.pt", weights_only=True)
    for name, case in ref.items():
        wave = case["input"]
        with torch.no_grad():
            fbank = model.spec.fbank(wave).transpose(1, 2)  # (B, frames, 80), as the reference
            features = model.features(wave).transpose(1, 2)
            pooled = model.pooled(wave)
            embedding = model(wave)
            # The statistics in float64 (front end as computed): the reference's own float32
            # variance is then the noisier of the two, so both must sit near the exact value.
            exact = model.double().pooled(wave.double())
            model.float()
        assert fbank.shape == case["fbank"].shape and rel(fbank, case["fbank"]) < TOL, name
        assert rel(features, case["features"]) < TOL, name
        assert pooled.shape == (wave.shape[0], model.pooled_dim) and rel(pooled, case["pooled"]) < TOL, name
        assert rel(case["pooled"], exact) < TOL and rel(pooled, exact) < TOL, name
        assert embedding.shape == (wave.shape[0], model.embed_dim) and rel(embedding, case["embedding"]) < TOL, name
        assert torch.equal(embedding, model.head(pooled))


def test_kind_config_and_sha256_come_from_the_files(ecapa, campplus):
    assert (ecapa.encoder, campplus.encoder) == ("ecapa-tdnn", "campplus")
    assert ecapa.model_config["channels"] == [1024, 1024, 1024, 1024, 3072]
    assert ecapa.model_config["dilations"] == [1, 2, 3, 4, 1]  # from hyperparams.yaml, not in the shapes
    assert (ecapa.pooled_dim, ecapa.embed_dim, campplus.pooled_dim, campplus.embed_dim) == (6144, 192, 1024, 192)
    sums = dict(reversed(line.split()) for d in (ECAPA, CAMPPLUS) for line in (d / "SHA256SUMS").read_text().splitlines())
    assert ecapa.weights_sha256 == sums["embedding_model.ckpt"]
    assert campplus.weights_sha256 == sums["campplus_cn_en_common.pt"]
    # The ckpt alone (no hyperparams.yaml beside it) gives the same model.
    alone = load_backbone(str(ECAPA / "embedding_model.ckpt"), backbone="ecapa-tdnn")
    assert alone.model_config == ecapa.model_config and alone.weights_sha256 == ecapa.weights_sha256


def test_registry_lists_every_encoder_without_torch():
    import subprocess
    import sys

    code = ("import sys; from mrlcache.backbone.registry import backbone_names; print(','.join(backbone_names())); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["redimnet,ecapa-tdnn,campplus", "False"]
    assert backbone_names() == tuple(BACKBONES) and "c1024" in config_names("ecapa-tdnn")


def _damaged(tmp_path, state, name):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_strict_loading_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    state = torch.load(CAMPPLUS_FILE, weights_only=True)
    state.pop("xvector.dense.linear.weight")
    state["xvector.extra.weight"] = torch.zeros(3)
    state["xvector.block1.tdnnd1.cam_layer.linear1.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as err:
        load_backbone(str(_damaged(tmp_path, state, "bad.pt")))
    text = str(err.value)
    # The dense weight is what the embedding size is read from: reading the shapes fails first.
    assert "xvector.dense.linear.weight" in text
    state = torch.load(CAMPPLUS_FILE, weights_only=True)
    state["xvector.extra.weight"] = torch.zeros(3)
    state["xvector.block1.tdnnd1.cam_layer.linear1.bias"] = torch.zeros(5)
    state.pop("xvector.transit1.linear.weight")
    state.pop("head.bn1.running_mean")  # reported under 3D-Speaker's name, not mrlcache's
    with pytest.raises(CheckpointError) as err:
        load_backbone(str(_damaged(tmp_path, state, "bad2.pt")))
    text = str(err.value)
    assert "missing (2): head.bn1.running_mean, xvector.transit1.linear.weight" in text and "unexpected (1): xvector.extra.weight" in text
    assert "block1.tdnnd1.cam_layer.linear1.bias (5,) (expected (64,))" in text


def test_wrong_kind_foreign_files_and_code_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="holds a campplus checkpoint, not ecapa-tdnn"):
        load_backbone(str(CAMPPLUS_FILE), backbone="ecapa-tdnn")
    with pytest.raises(CheckpointError, match="not a ReDimNet checkpoint .* nor the published weights of another encoder"):
        load_backbone(str(_damaged(tmp_path, {"w": torch.zeros(2)}, "foreign.pt")))
    with pytest.raises(CheckpointError, match="no weights file"):
        load_backbone(str(tmp_path))  # an empty folder
    with pytest.raises(CheckpointError, match="b2 is a ReDimNet variant"):
        load_backbone("b2", backbone="campplus")
    # A hyperparams.yaml that disagrees with the weights is refused, not silently overridden.
    folder = tmp_path / "sb"
    folder.mkdir()
    (folder / "embedding_model.ckpt").symlink_to(ECAPA / "embedding_model.ckpt")
    (folder / "hyperparams.yaml").write_text((ECAPA / "hyperparams.yaml").read_text().replace("lin_neurons: 192",
                                                                                              "lin_neurons: 256"))
    with pytest.raises(CheckpointError, match="lin_neurons 256 \\(weights: 192\\)"):
        load_backbone(str(folder))


@pytest.mark.parametrize("backbone,config", [("ecapa-tdnn", "c512"), ("campplus", "e192")])
def test_random_weights_save_under_published_names_and_load_back(backbone, config, tmp_path):
    model = load_backbone(config, backbone=backbone, random_init=True, seed=1)
    again = load_backbone(config, backbone=backbone, random_init=True, seed=1)
    wave = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(wave), again(wave))  # the seed makes the weights
    sha = save_checkpoint(model, tmp_path / "backbone.pt")
    assert sha == hashlib.sha256((tmp_path / "backbone.pt").read_bytes()).hexdigest()
    saved = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert saved["encoder"] == backbone
    if backbone == "campplus":  # 3D-Speaker's names: the file loads into its CAMPPlus too
        assert "head.conv1.weight" in saved["state_dict"] and "xvector.dense.linear.weight" in saved["state_dict"]
    loaded = load_backbone(str(tmp_path / "backbone.pt"))
    assert loaded.encoder == backbone and loaded.weights_sha256 == sha
    with torch.no_grad():
        assert torch.equal(loaded.pooled(wave), model.pooled(wave))


def test_record_names_the_encoder_and_redimnet_records_keep_four_keys(ecapa):
    record = BackboneRecord.file(ECAPA).of_model(ecapa)
    assert record.to_dict()["encoder"] == "ecapa-tdnn" and record.sha256 == ecapa.weights_sha256
    assert BackboneRecord.from_dict(record.to_dict()) == record
    old = {"source": "b2", "train_type": "ptn", "dataset": "vox2", "sha256": "0" * 64}
    assert BackboneRecord.from_dict(old).encoder is None and BackboneRecord.from_dict(old).to_dict() == old


def test_extract_refuses_layers_of_several_widths_in_one_line(tmp_path):
    # Published CAM++ has equally wide last transitions (512); one with init_channels other than
    # 4 x growth_rate does not, and its layers cannot be stacked (test_encoder_layers.py: the rest).
    from click.testing import CliRunner
    from conftest import make_tree

    from mrlcache.backbone import campplus
    from mrlcache.cli import main

    make_tree(tmp_path / "data", speakers=2, videos=1, utts=1, seconds=1.0)
    model = campplus.build({"growth_rate": 8, "bn_size": 2, "init_channels": 16, "embedding_size": 24})
    save_checkpoint(model, tmp_path / "narrow.pt")
    result = CliRunner().invoke(main, ["extract", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"),
                                       "--weights", str(tmp_path / "narrow.pt"), "--streams", "pooled,layers",
                                       "--quiet"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: --streams pooled,layers: the layers stream stacks campplus's block outputs, which needs one "
        "width; this configuration has [124, 126]")
    assert not (tmp_path / "c").exists()  # refused before anything was written
