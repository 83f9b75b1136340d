"""Every model fit can write exports (ONNX and TorchScript) and agrees with load_model.

Parametrised over the registries: registering a head or a fusion tests its export. Widths
are tiny so each export takes seconds; the pooled Matryoshka model on a ReDimNet is
covered by test_export.py.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import speech_like, tiny_head_args

from mrlcache import load_model
from mrlcache.cli import main
from mrlcache.export import ExportError, export_model, verify_export
from mrlcache.models import FUSIONS, HEADS, head_class
from mrlcache.models.model import save_model
from mrlcache.models.streams import StreamModel, plan_groups
from mrlcache.streams import StreamRecord
from mrlcache.streams import StreamRecord

pytest.importorskip("onnxruntime")

OPTIONS = {"ecapa": dict(channels=8, scale=2, mfa_channels=16, attention_bottleneck=4, se_bottleneck=4)}
FRAMES = {n: StreamRecord(n, "frames", shape, "float16", 100.0, ragged=True)
          for n, shape in (("fbank", (80,)), ("mfcc", (40,)), ("f0", (2,)), ("layers", (3, 8)))}
FORMATS = ("onnx", "torchscript")


class TinyOptions:
    """A fit's options, tiny (every head reads its own)."""

    ecapa_channels, ecapa_scale, ecapa_mfa_channels, ecapa_bottleneck = 8, 2, 16, 4


def _trained_looking(model):
    """Weights and BatchNorm statistics away from their initial values, so a lost tensor shows."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=g)
            elif name.endswith("running_mean"):
                b.normal_(0.0, 0.3, generator=g)
            elif b.is_floating_point():  # other state (e.g. a started head's published map)
                b.add_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def _stream_model(inputs, head, fusion=None):
    torch.manual_seed(0)
    args = {**tiny_head_args(head, [4, 8], options=TinyOptions()), **OPTIONS.get(head, {})}
    return _trained_looking(StreamModel(plan_groups(inputs, FRAMES), head, args, fusion=fusion, encoder_dim=8))


def _run(path, fmt, xs):
    """The exported file on numpy inputs, by its own runtime (not through mrlcache.export)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), xs)})[0]
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(*(torch.from_numpy(x) for x in xs)).numpy()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def _waves(batch, seconds):
    return np.stack([speech_like(seconds, seed=batch + i, f0=100.0 + 25 * i) for i in range(batch)]).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_on_handcrafted_frames_exports_wave_in(tmp_path, head, fmt):
    model = load_model(save_model(tmp_path / "model.pt", _stream_model(["fbank", "mfcc"], head)))
    path = export_model(model, tmp_path / f"m.{fmt}", format=fmt)
    for seconds, batch in ((1.0, 1), (1.37, 3)):
        x = _waves(batch, seconds)
        got = _run(path, fmt, [x])
        assert got.shape == (batch, 8)
        assert _rel(got, model(x)) <= 1e-4, (head, seconds, batch)
        assert _rel(got[:, :4], model(x, 4)) <= 1e-4
    assert verify_export(path, model)["passed"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_every_fusion_exports_on_cached_streams(tmp_path, fusion, fmt):
    # Head-only (no backbone): the layer stack and the fbank frames go in, as project takes them.
    model = load_model(save_model(tmp_path / "model.pt", _stream_model(["layers", "fbank"], "mrl", fusion)))
    path = export_model(model, tmp_path / f"m.{fmt}", format=fmt)
    g = np.random.default_rng(0)
    for batch, frames in ((1, 40), (3, 97)):
        xs = [g.standard_normal((batch, 3, 8, frames + 3)).astype(np.float32),
              g.standard_normal((batch, 80, frames)).astype(np.float32)]
        got = _run(path, fmt, xs)
        want = model.project({"layers": xs[0], "fbank": xs[1]})
        assert got.shape == (batch, 8) and _rel(got, want) <= 1e-4, (fusion, batch, frames)
    report = verify_export(path, model)
    assert report["passed"] and len(report["errors"]) == 2 * 2 * 2  # lengths x batches x dims


def test_a_head_only_pooled_model_takes_vectors(tmp_path):
    torch.manual_seed(0)
    head = _trained_looking(head_class("mrl")(16, [4, 8]))
    model = load_model(save_model(tmp_path / "model.pt", head))
    path = export_model(model, tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    assert _rel(_run(path, "onnx", [x]), model.project(x)) <= 1e-5


@pytest.mark.slow  # exports a tiny ReDimNet twice (ONNX, TorchScript)
@pytest.mark.parametrize("head, fusion", [("mrl", "gating"), ("ecapa", "concat")])
def test_a_stream_model_on_a_backbone_exports_wave_in(tmp_path, head, fusion):
    from conftest import TINY

    from mrlcache import streams
    from mrlcache.backbone.redimnet import ReDimNet

    # The layer stack and fbank front ends on a backbone are what this checks, not a width:
    # the tiny ReDimNet (about half a b0's export time); b0 and b2 export in test_engine/test_export.
    torch.manual_seed(1)
    backbone = ReDimNet(TINY).eval()
    info = {**FRAMES, "layers": StreamRecord("layers", "frames", tuple(streams.item_shape("layers", backbone)),
                                             "float16", 100.0, ragged=True)}
    torch.manual_seed(0)
    args = {"dims": [4, 8], **OPTIONS.get(head, {})}
    stream = _trained_looking(StreamModel(plan_groups(["layers", "fbank"], info), head, args, fusion=fusion,
                                          encoder_dim=8))
    model = load_model(save_model(tmp_path / "model.pt", stream, backbone=backbone))
    for fmt in FORMATS:
        path = export_model(model, tmp_path / f"m.{fmt}", format=fmt)
        for seconds, batch in ((1.0, 1), (2.37, 3)):
            x = _waves(batch, seconds)
            assert _rel(_run(path, fmt, [x]), model(x)) <= 1e-4, (fmt, seconds, batch)


def test_f0_is_refused_in_one_line_naming_the_stream(tmp_path):
    model_path = save_model(tmp_path / "model.pt", _stream_model(["fbank", "f0"], "mrl"))
    with pytest.raises(ExportError, match="stream 'f0' cannot be exported"):
        export_model(load_model(model_path), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["export", str(model_path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code != 0 and "stream 'f0' cannot be exported" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
