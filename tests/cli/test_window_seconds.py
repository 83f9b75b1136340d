"""--window-seconds on the commands that embed whole files: embed, verify, eer --data."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import speech_like, write_wav

from mrlcache.backbone.loading import load_backbone
from mrlcache.cli import main
from mrlcache.evaluate import pooled_from_audio
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import save_model
from mrlcache.streams import windows
from mrlcache.trials import read_trials


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows")
    torch.manual_seed(0)
    backbone = load_backbone("b0", random_init=True, seed=0)  # the b0 whose engine tests/export exports too
    head = MatryoshkaHead(backbone.pooled_dim, (8, 16)).eval()
    save_model(root / "model.pt", head, backbone=backbone)
    files = {"long.wav": speech_like(2.7, seed=1, f0=120.0), "short.wav": speech_like(0.9, seed=2, f0=150.0)}
    for name, wave in files.items():
        write_wav(root / "data" / "id00001" / name, wave, 16000, subtype="FLOAT")
    return root, backbone, head, files


def _expected(backbone, head, wave, window):
    with torch.no_grad():
        return head(windows.pooled(backbone, torch.from_numpy(wave)[None], window))[0].numpy()


def test_embed_windows_long_files_only(setup, tmp_path):
    root, backbone, head, files = setup
    got = {}
    for window in ("1", "none"):
        out = tmp_path / f"{window}.npy"
        result = run("embed", "--model", root / "model.pt", root / "data", "--out", out, "--window-seconds", window)
        assert result.exit_code == 0, result.output
        ids = (tmp_path / f"{window}.ids.txt").read_text().split()
        got[window] = dict(zip(ids, np.load(out)))
    long_id, short_id = [next(u for u in got["1"] if u.endswith(n)) for n in ("long.wav", "short.wav")]
    np.testing.assert_allclose(got["1"][long_id], _expected(backbone, head, files["long.wav"], 1.0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(got["none"][long_id], _expected(backbone, head, files["long.wav"], None), rtol=1e-4,
                               atol=1e-5)
    assert not np.allclose(got["1"][long_id], got["none"][long_id], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(got["1"][short_id], got["none"][short_id])  # shorter than the window


def test_embed_with_onnxruntime_windows_alike(setup, tmp_path):
    root, backbone, head, files = setup
    out = tmp_path / "ort.npy"
    result = run("embed", "--model", root / "model.pt", root / "data" / "id00001" / "long.wav", "--out", out,
                 "--window-seconds", "1", "--engine", "onnxruntime")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(out)[0], _expected(backbone, head, files["long.wav"], 1.0), rtol=1e-3,
                               atol=1e-4)


def test_verify_scores_windowed_embeddings(setup, tmp_path):
    root, backbone, head, files = setup
    out = tmp_path / "v.json"
    result = run("verify", "--model", root / "model.pt", root / "data/id00001/long.wav",
                 root / "data/id00001/short.wav", "--window-seconds", "1", "--json", out)
    assert result.exit_code == 0, result.output
    a, b = (_expected(backbone, head, files[n], 1.0) for n in ("long.wav", "short.wav"))
    want = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert json.loads(out.read_text())["pairs"][0]["score"] == pytest.approx(want, abs=1e-5)


def test_trial_audio_is_pooled_window_by_window(setup, tmp_path):
    root, backbone, _, files = setup
    trials = tmp_path / "trials.txt"
    trials.write_text("1 id00001/long.wav id00001/short.wav\n")
    vectors = pooled_from_audio(backbone, root / "data", read_trials(trials), window_seconds=1.0, progress=False)
    row = vectors.utterances.index("id00001/long.wav")
    with torch.no_grad():
        want = windows.pooled(backbone, torch.from_numpy(files["long.wav"])[None], 1.0)[0].numpy()
    np.testing.assert_allclose(vectors.pooled[row], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("command", ["embed", "verify", "eer"])
def test_a_window_under_a_second_is_refused_in_one_line(setup, command):
    root = setup[0]
    result = run(command, "--model", root / "model.pt", "--window-seconds", "0.2")
    assert result.exit_code == 2 and "--window-seconds" in result.output and "0.2 is not a finite number >= 1 (seconds)" in result.output
