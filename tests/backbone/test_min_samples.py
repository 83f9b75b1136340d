"""Each encoder declares the shortest wave it takes, and every command that knows the encoder
refuses a shorter file in one line naming the file and that minimum (never a traceback or a
NaN vector).

Found by experiment (issue 19 item 3): ReDimNet's mel front end needs 257 samples, the
reflect-padded TDNNs of ECAPA-TDNN 640 (its largest padding, 4 frames, times the 160-sample
hop), CAM++ 720 (three fbank frames, or its unbiased std over one frame is NaN).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, speech_like, write_wav, error_line

from mrlcache.audio import MIN_SAMPLES, SAMPLE_RATE
from mrlcache.backbone import ReDimNet, save_checkpoint
from mrlcache.backbone.registry import BACKBONES, backbone_names, encoder_module, wave_minimum
from mrlcache.cli import main
from mrlcache.model import save_model
from mrlcache.models.matryoshka import MatryoshkaHead

# A random small configuration of every registered encoder (a new encoder adds one line).
SMALL = {
    "redimnet": TINY,
    "ecapa-tdnn": {"channels": [16, 16, 16, 16, 48], "attention_channels": 8, "se_channels": 8,
                   "res2net_scale": 4, "lin_neurons": 8},
    "campplus": {"growth_rate": 8, "bn_size": 2, "init_channels": 16, "embedding_size": 8},
}
# Configurations whose minimum differs from the default's: a longer dilation, a larger FFT.
OTHER = [
    ("ecapa-tdnn", {**SMALL["ecapa-tdnn"], "channels": [16, 16, 16, 16, 16, 48], "kernel_sizes": [5, 3, 3, 3, 3, 1],
                    "dilations": [1, 2, 3, 4, 5, 1]}, 800),
    ("ecapa-tdnn", {**SMALL["ecapa-tdnn"], "channels": [16, 16, 16, 48], "kernel_sizes": [5, 3, 3, 1],
                    "dilations": [1, 2, 3, 1]}, 480),
    ("redimnet", {**TINY, "spec_params": {"n_fft": 1024}}, 513),
]
KNOWN = {"redimnet": MIN_SAMPLES, "ecapa-tdnn": 640, "campplus": 720}


def build(name, config):
    torch.manual_seed(0)
    model = ReDimNet(config) if name == "redimnet" else encoder_module(name).build(config)
    return model.eval()


def runs(model, samples: int) -> bool:
    """Does ``model`` give a finite embedding and pooled vector for a wave of ``samples``?"""
    wave = torch.from_numpy(speech_like(1.0)[:samples].copy())[None]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's std over one frame
            return bool(torch.isfinite(model(wave)).all() and torch.isfinite(model.pooled(wave)).all())
    except RuntimeError:
        return False


def test_every_encoder_has_a_small_config():
    assert set(SMALL) == set(backbone_names()) == set(BACKBONES) == set(KNOWN)


@pytest.mark.parametrize("name", backbone_names())
def test_declared_minimum_is_the_shortest_wave_the_encoder_takes(name):
    model = build(name, SMALL[name])
    assert model.min_samples == KNOWN[name]
    assert wave_minimum(model) == (KNOWN[name], f"the {name} encoder")
    assert runs(model, model.min_samples)
    assert not runs(model, model.min_samples - 1)


@pytest.mark.parametrize("name, config, minimum", OTHER)
def test_minimum_follows_the_configuration(name, config, minimum):
    model = build(name, config)
    assert model.min_samples == minimum
    assert runs(model, minimum) and not runs(model, minimum - 1)


def test_inference_copy_and_unknown_models_keep_a_minimum():
    model = build("redimnet", TINY)
    assert model.for_inference().min_samples == MIN_SAMPLES
    assert wave_minimum(None) == (MIN_SAMPLES, "the model")


# ---------------------------------------------------------------------------------------
# Commands: a file long enough for ReDimNet but too short for the encoder is refused.
# ---------------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])




@pytest.fixture(scope="module", params=["ecapa-tdnn", "campplus"])
def encoder_model(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    backbone = build(name, SMALL[name])
    save_checkpoint(backbone, root / "backbone.pt")
    torch.manual_seed(1)
    save_model(root / "model.pt", MatryoshkaHead(backbone.pooled_dim, [4, 8]).eval(), backbone=backbone)
    need = KNOWN[name]
    short = write_wav(root / "data" / "a" / "short.wav", speech_like(1.0)[:need - 1], SAMPLE_RATE)
    exact = write_wav(root / "data" / "b" / "exact.wav", speech_like(1.0, seed=1)[:need], SAMPLE_RATE)
    voice = write_wav(root / "data" / "b" / "voice.wav", speech_like(1.0, seed=2), SAMPLE_RATE)
    return name, root, need, short, exact, voice


def test_embed_refuses_a_file_too_short_for_the_encoder(encoder_model, tmp_path):
    name, root, need, short, exact, _ = encoder_model
    line = error_line(run("embed", "--model", root / "model.pt", short, "--out", tmp_path / "e.npy"))
    assert f"{short}: too_short: {need - 1} samples, the {name} encoder needs at least {need}" in line
    assert not (tmp_path / "e.npy").exists()
    result = run("embed", "--model", root / "model.pt", exact, "--out", tmp_path / "e.npy")
    assert result.exit_code == 0, result.output
    assert np.isfinite(np.load(tmp_path / "e.npy")).all()


def test_embed_refuses_a_cap_too_short_for_the_encoder(encoder_model, tmp_path):
    name, root, need, _, _, voice = encoder_model
    line = error_line(run("embed", "--model", root / "model.pt", voice, "--out", tmp_path / "e.npy",
                          "--max-seconds", "0.03"))
    assert f"{voice}: too_short: 480 samples, the {name} encoder needs at least {need}" in line


def test_verify_refuses_a_file_too_short_for_the_encoder(encoder_model):
    name, root, need, short, _, voice = encoder_model
    line = error_line(run("verify", "--model", root / "model.pt", voice, short))
    assert f"{short}: too_short: {need - 1} samples, the {name} encoder needs at least {need}" in line


def test_eer_data_names_a_file_too_short_for_the_encoder(encoder_model, tmp_path):
    name, root, need, short, exact, voice = encoder_model
    trials = tmp_path / "trials.txt"
    trials.write_text("0 a/short.wav b/voice.wav\n1 b/exact.wav b/voice.wav\n0 b/exact.wav a/short.wav\n")
    line = error_line(run("eer", "--model", root / "model.pt", "--trials", trials, "--data", root / "data"))
    assert "a/short.wav" in line and f"the {name} encoder needs at least {need}" in line


def test_extract_records_a_file_too_short_for_the_encoder(encoder_model, tmp_path):
    name, root, need, *_ = encoder_model
    result = run("extract", "--data", root / "data", "--out", tmp_path / "c", "--backbone", name,
                 "--weights", root / "backbone.pt", "--mode", "eval", "--min-seconds", "0.001", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output + repr(result.exception)
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta["summary"]["skipped_by_reason"] == {"too_short": 1}, meta["summary"]
    line = error_line(run("extract", "--data", root / "data", "--out", tmp_path / "d", "--backbone", name,
                          "--weights", root / "backbone.pt", "--crop-seconds", "0.03", "--workers", "0", "--quiet"))
    assert f"--crop-seconds 0.03: the {name} encoder needs at least {need} samples" in line
    assert not (tmp_path / "d").exists()
