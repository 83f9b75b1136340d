"""Export to ONNX and TorchScript: the exportable front end against MelBanks and the
reference mel, exported files run in onnxruntime / torch against load_model at every dim,
head-only export, the CLI and its refusals."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import speech_like

from mrlcache.cli.export import export as export_cmd
from mrlcache.export import ExportableMelBanks, ExportError, export_model, verify_export
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import load_model, save_model
from mrlcache.backbone.features import MelBanks
from mrlcache.backbone.loading import build_from_checkpoint, load_backbone

FIXTURES = Path(os.environ.get("MRLCACHE_REDIMNET_FIXTURES",
                               Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "redimnet"))
needs_fixtures = pytest.mark.skipif(os.environ.get("MRLCACHE_SKIP_MISSING_FIXTURES") == "1"
                                    and not (FIXTURES / "b2.pt").is_file(),
                                    reason=f"ReDimNet reference fixtures not found in {FIXTURES}")
DIMS = [16, 48, 96]
LENGTHS = (16000, 27311)  # 1 s and an odd length
BATCHES = (1, 3)


def rel_err(a, b):
    """Largest row-wise |a - b| / |b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float((np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max())


def waves(batch, n):
    return np.stack([speech_like(n / 16000, seed=i + n, f0=90.0 + 30 * i) for i in range(batch)])


def _head(pooled_dim, dims, seed=1):
    torch.manual_seed(seed)
    head = MatryoshkaHead(pooled_dim, dims)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a fitted head has
        head.bn.running_mean.normal_(0, 0.5)
        head.bn.running_var.uniform_(0.5, 2.0)
    return head.eval()


@pytest.fixture(scope="module")
def redimnet_model(tmp_path_factory):
    """model.pt of a random-init tiny ReDimNet (conftest.TINY: its ResBlocks with fwSE are b0's
    ResBlocks plus fwSE; b0's own graph is exported by test_engine, b2's below) plus a head
    with dims 16, 48, 96."""
    from conftest import TINY

    from mrlcache.backbone.redimnet import ReDimNet

    torch.manual_seed(0)
    backbone = ReDimNet(TINY).eval()
    return save_model(tmp_path_factory.mktemp("redimnet") / "model.pt", _head(backbone.pooled_dim, DIMS),
                      backbone=backbone)


@pytest.fixture(scope="module")
def head_only_model(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("head") / "model.pt", _head(64, [8, 32]))


def run_file(path, fmt, x):
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


# ---- front end ----------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"n_mels": 60},  # b0's front end
    {"n_mels": 72, "spec_norm": "mvn"},
    {"n_mels": 40, "norm_signal": True, "do_preemph": False},
    {"n_mels": 64, "n_fft": 400, "win_length": 400},  # no zero-padded window
])
def test_front_end_equals_melbanks(settings):
    reference = MelBanks(**settings)
    ours = ExportableMelBanks(reference)
    for n in (8000, 27311):
        x = torch.from_numpy(waves(2, n))
        want = reference(x)
        got = ours(x)
        assert got.shape == want.shape == (2, settings["n_mels"], n // 160 + 1)
        assert ((got - want).norm() / want.norm()).item() < 1e-5


@needs_fixtures
@pytest.mark.parametrize("inp", ["batch2", "single"])
def test_front_end_gives_the_reference_mel(inp):
    b2 = build_from_checkpoint(torch.load(FIXTURES / "b2.pt", weights_only=True), "b2.pt")
    ref = torch.load(FIXTURES / "b2.ref.pt", weights_only=True)[inp]
    with torch.no_grad():
        mel = ExportableMelBanks(b2.spec)(ref["input"])
    assert mel.shape == ref["mel"].shape
    assert ((mel.double() - ref["mel"].double()).norm() / ref["mel"].double().norm()).item() < 1e-5


# ---- whole model --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_equals_load_model(redimnet_model, tmp_path, fmt):
    model = load_model(redimnet_model)
    path = export_model(model, tmp_path / f"model.{fmt}", format=fmt)
    for n in LENGTHS:
        for batch in BATCHES:
            x = waves(batch, n).astype(np.float32)
            got = run_file(path, fmt, x)
            assert got.shape == (batch, max(DIMS))
            want = model.embed_all(x)
            for d in DIMS:
                assert rel_err(got[:, :d], want[d]) <= 1e-4, (n, batch, d)
    report = verify_export(path, model)
    assert report["passed"] and report["max_rel_error"] <= 1e-4
    assert {d for _, _, d in report["errors"]} == set(DIMS)


@pytest.mark.slow
def test_export_of_some_dims_outputs_the_largest(redimnet_model, tmp_path):
    model = load_model(redimnet_model)
    path = export_model(model, tmp_path / "small.pt", format="torchscript", dims=[16, 48])
    x = waves(2, 16000).astype(np.float32)
    got = run_file(path, "torchscript", x)
    assert got.shape == (2, 48)
    assert rel_err(got[:, :16], model(x, 16)) <= 1e-4
    assert verify_export(path, model)["errors"].keys() == {(s, b, d) for s in (1.0, 2.37) for b in (1, 3)
                                                           for d in (16, 48)}


def test_export_refuses_dims_and_formats(head_only_model, tmp_path):
    model = load_model(head_only_model)
    with pytest.raises(ExportError, match=r"dims 8,10: the model was trained for dims \[8, 32\] only"):
        export_model(model, tmp_path / "x.onnx", dims=[8, 10])
    with pytest.raises(ExportError, match="format 'tflite'"):
        export_model(model, tmp_path / "x.tflite", format="tflite")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_head_only_model_exports_the_head(head_only_model, tmp_path, fmt):
    model = load_model(head_only_model)
    path = export_model(model, tmp_path / f"head.{fmt}", format=fmt)
    for batch in BATCHES:
        pooled = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
        got = run_file(path, fmt, pooled)
        for d in (8, 32):
            assert rel_err(got[:, :d], model.project(pooled, d)) <= 1e-5
    assert verify_export(path, model)["passed"]


def test_verify_without_onnxruntime_says_how_to_install(head_only_model, tmp_path, monkeypatch):
    model = load_model(head_only_model)
    path = export_model(model, tmp_path / "head.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r"needs onnxruntime: pip install 'mrlcache\[export\]'"):
        verify_export(path, model)


def test_verify_refuses_a_file_that_is_not_a_model(head_only_model, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="junk.onnx: not an ONNX or TorchScript file"):
        verify_export(junk, load_model(head_only_model))


@needs_fixtures
@pytest.mark.slow
def test_b2_checkpoint_exports_to_onnx(tmp_path):
    backbone = load_backbone(str(FIXTURES / "b2.pt"))
    model_pt = save_model(tmp_path / "model.pt", _head(backbone.pooled_dim, [64, 192]), backbone=backbone)
    model = load_model(model_pt)
    path = export_model(model, tmp_path / "b2.onnx", format="onnx")
    x = waves(2, 20000).astype(np.float32)
    got, want = run_file(path, "onnx", x), model.embed_all(x)
    for d in (64, 192):
        assert rel_err(got[:, :d], want[d]) <= 1e-4
    assert verify_export(path, model, lengths=(1.0, 1.6), batches=(1, 2))["passed"]


# ---- command line -------------------------------------------------------------------


@pytest.mark.slow
def test_cli_export_with_verify(redimnet_model, tmp_path):
    out = tmp_path / "model.ts"
    result = CliRunner().invoke(export_cmd, [str(redimnet_model), "--format", "torchscript", "--out", str(out),
                                             "--dims", "16,96", "--verify"])
    assert result.exit_code == 0, result.output
    assert "verify: max relative error" in result.output and "(passed" in result.output
    x = waves(1, 16000).astype(np.float32)
    assert rel_err(run_file(out, "torchscript", x)[:, :96], load_model(redimnet_model)(x, 96)) <= 1e-4


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "Invalid value for '--format'"),
    (["--format", "onnx", "--dims", "8,9"], "dims 8,9: the model was trained for dims [8, 32] only"),
    (["--format", "onnx", "--dims", "8,x"], "'x' is not an integer >= 1; give comma-separated values"),
    (["--format", "torchscript", "--opset", "17"], "drop --opset for torchscript"),
])
def test_cli_refusals_are_one_line(head_only_model, tmp_path, args, message):
    result = CliRunner().invoke(export_cmd, [str(head_only_model), "--out", str(tmp_path / "x"), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "x").exists()
