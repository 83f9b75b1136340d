"""``--engine onnxruntime``: extract and embed with the backbone in onnxruntime equal PyTorch.

The backbone is exported (exportable mel front end, dynamo exporter) and run by
onnxruntime; its pooled vectors must equal ``ReDimNet.pooled`` to float32 rounding, and
the cache records the engine, so one cache is never filled by both.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_tree

import mrlcache.cache as cache_mod
from mrlcache.backbone import load_backbone
from mrlcache.cli import main

pytestmark = pytest.mark.slow


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rel(a, b):
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


def test_engine_is_exported_once_then_read_from_disk_and_checked(tmp_path, monkeypatch):
    import mrlcache.export.engine as engine_mod

    from mrlcache.backbone import ecapa_tdnn

    # The engine cache is the same for every encoder; a tiny ECAPA-TDNN is the quickest to
    # export (about half the tiny ReDimNet's time), and this test exports three times.
    tiny = {"channels": [16, 16, 16, 16, 48], "attention_channels": 8, "se_channels": 8, "res2net_scale": 4,
            "lin_neurons": 8}
    torch.manual_seed(3)
    backbone = ecapa_tdnn.build(tiny).eval()
    notes = []
    first = engine_mod.OnnxBackbone(backbone, cache_dir=tmp_path / "c", log=notes.append)
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".onnx") and not notes

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    real_export = engine_mod._export
    monkeypatch.setattr(engine_mod, "_export", no_export)
    second = engine_mod.OnnxBackbone(backbone, cache_dir=tmp_path / "c", spin=False, log=notes.append)
    wave = 0.1 * torch.randn(2, 9000, generator=torch.Generator().manual_seed(5))
    assert np.array_equal(first.pooled(wave).numpy(), second.pooled(wave).numpy()) and not notes

    # A damaged file does not match its record: exported again, and said so.
    onnx_file = next((tmp_path / "c").glob("*.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setattr(engine_mod, "_export", real_export)
    engine_mod.OnnxBackbone(backbone, cache_dir=tmp_path / "c", log=notes.append)
    assert len(notes) == 1 and "does not match" in notes[0]
    # Other weights: another key, another file.
    torch.manual_seed(4)
    other = ecapa_tdnn.build(tiny).eval()
    assert engine_mod.engine_key(other) != engine_mod.engine_key(backbone)
    engine_mod.OnnxBackbone(other, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.onnx"))) == 2


def test_onnx_backbone_pooled_equals_torch_at_two_lengths_and_batches():
    from mrlcache.export import OnnxBackbone

    # Seed 0: extract --random-init's b0, so the engine exported by either test is read from
    # the session's engine cache by the other (tests/conftest.py).
    backbone = load_backbone("b0", random_init=True, seed=0)
    engine = OnnxBackbone(backbone)
    g = torch.Generator().manual_seed(1)
    for batch, samples in ((1, 12000), (3, 27111)):
        wave = 0.1 * torch.randn(batch, samples, generator=g)
        with torch.no_grad():
            want = backbone.pooled(wave).numpy()
        assert rel(engine.pooled(wave).numpy(), want) < 1e-4


def test_extract_and_embed_with_onnxruntime_equal_the_torch_engine(tmp_path):
    make_tree(tmp_path / "data", speakers=2, videos=1, utts=2, seconds=1.0)
    common = ["--data", tmp_path / "data", "--random-init", "--variant", "b0", "--views", "2", "--crop-seconds",
              "0.8", "--dtype", "float32", "--threads", "1", "--workers", "0", "--quiet"]
    assert run("extract", *common, "--out", tmp_path / "torch").exit_code == 0
    result = run("extract", *common, "--out", tmp_path / "ort", "--engine", "onnxruntime")
    assert result.exit_code == 0, result.output
    a, b = cache_mod.open(tmp_path / "torch"), cache_mod.open(tmp_path / "ort")
    assert a.utterances == b.utterances
    assert rel(b.read("pooled"), a.read("pooled")) < 1e-4
    assert b.meta["engine"] == "onnxruntime" and "engine" not in a.meta  # torch caches as before
    # Resuming a cache with the other engine is refused, naming the setting.
    result = run("extract", *common, "--out", tmp_path / "ort")
    assert result.exit_code != 0 and "engine" in result.output

    from mrlcache.models.matryoshka import MatryoshkaHead
    from mrlcache.models.model import save_model

    torch.manual_seed(0)
    backbone = load_backbone(str(tmp_path / "torch" / "backbone.pt"))
    save_model(tmp_path / "model.pt", MatryoshkaHead(backbone.pooled_dim, (8, 16)).eval(), backbone=backbone)
    for engine in ("torch", "onnxruntime"):
        result = run("embed", "--model", tmp_path / "model.pt", tmp_path / "data", "--out", tmp_path / f"{engine}.npy",
                     "--engine", engine)
        assert result.exit_code == 0, result.output
    assert rel(np.load(tmp_path / "onnxruntime.npy"), np.load(tmp_path / "torch.npy")) < 1e-4
    assert run("extract", *common, "--out", tmp_path / "x", "--engine", "onnxruntime",
               "--streams", "pooled,fbank").exit_code != 0


def test_fused_engine_is_within_1e5_of_torch_recorded_and_never_mixed(tmp_path):
    """``--engine fused`` (BatchNorm folded, channels-last) is opt-in: the torch engine keeps
    today's bytes, the fused cache is within 1e-5 of it and records its engine."""
    make_tree(tmp_path / "data", speakers=2, videos=1, utts=2, seconds=1.0)
    common = ["--data", tmp_path / "data", "--random-init", "--variant", "b0", "--views", "2", "--crop-seconds",
              "0.8", "--dtype", "float32", "--threads", "1", "--workers", "0", "--quiet"]
    assert run("extract", *common, "--out", tmp_path / "torch").exit_code == 0
    result = run("extract", *common, "--out", tmp_path / "fused", "--engine", "fused")
    assert result.exit_code == 0, result.output
    a, b = cache_mod.open(tmp_path / "torch"), cache_mod.open(tmp_path / "fused")
    assert rel(b.read("pooled"), a.read("pooled")) < 1e-5
    assert not np.array_equal(b.read("pooled"), a.read("pooled"))  # a different computation, hence recorded
    assert b.meta["engine"] == "fused" and "engine" not in a.meta
    result = run("extract", *common, "--out", tmp_path / "fused")
    assert result.exit_code != 0 and "engine" in result.output
    result = run("extract", *common, "--out", tmp_path / "x", "--engine", "fused", "--streams", "pooled,layers")
    assert result.exit_code != 0 and "--engine fused" in result.output and "Traceback" not in result.output

    from mrlcache.models.matryoshka import MatryoshkaHead
    from mrlcache.models.model import save_model

    torch.manual_seed(0)
    backbone = load_backbone(str(tmp_path / "torch" / "backbone.pt"))
    save_model(tmp_path / "model.pt", MatryoshkaHead(backbone.pooled_dim, (8, 16)).eval(), backbone=backbone)
    for engine in ("torch", "fused"):
        result = run("embed", "--model", tmp_path / "model.pt", tmp_path / "data", "--out", tmp_path / f"{engine}.npy",
                     "--engine", engine)
        assert result.exit_code == 0, result.output
    assert rel(np.load(tmp_path / "fused.npy"), np.load(tmp_path / "torch.npy")) < 1e-5


def test_auto_picks_the_measured_engine_and_keeps_torch_where_only_torch_computes():
    """``auto`` picks from the registry: on the CPU for a pooled-only float32 job the engine
    measured for the encoder (``CPU_CHOICE``); torch on CUDA, for other jobs, and for encoders
    without a measurement."""
    from mrlcache import engines, names

    assert set(engines.CPU_CHOICE.values()) <= set(names.ENGINES) - {"auto"}
    redimnet = load_backbone("b0", random_init=True, seed=0)
    chosen = engines.CPU_CHOICE["redimnet"]
    assert engines.choose("auto", redimnet, device_type="cpu", pooled_float32=True)[0] == chosen != "torch"
    assert engines.choose("auto", redimnet, device_type="cuda", pooled_float32=True)[0] == "torch"
    assert engines.choose("auto", redimnet, device_type="cpu", pooled_float32=False)[0] == "torch"
    assert engines.choose("auto", None, device_type="cpu", pooled_float32=True)[0] == "torch"
    assert engines.choose("onnxruntime", redimnet, device_type="cpu", pooled_float32=True)[0] == "onnxruntime"
    other = load_backbone("c512", backbone="ecapa-tdnn", random_init=True, seed=0)
    want = engines.CPU_CHOICE.get("ecapa-tdnn", "torch")
    assert engines.choose("auto", other, device_type="cpu", pooled_float32=True)[0] == want


def test_extract_and_embed_with_auto_record_the_engine_they_ran(tmp_path):
    """``--engine auto`` with a decoding worker: the cache records the engine chosen, and its
    vectors are that engine's (within 1e-5 of torch's); a job only torch computes stays torch."""
    from mrlcache import engines

    chosen = engines.CPU_CHOICE["redimnet"]
    make_tree(tmp_path / "data", speakers=2, videos=1, utts=2, seconds=1.0)
    common = ["--data", tmp_path / "data", "--random-init", "--variant", "b0", "--views", "2", "--crop-seconds",
              "0.8", "--dtype", "float32", "--threads", "1", "--workers", "1", "--quiet"]
    for out, engine in (("torch", "torch"), ("auto", "auto"), ("named", chosen)):
        result = run("extract", *common, "--out", tmp_path / out, "--engine", engine)
        assert result.exit_code == 0, result.output
    torch_cache, auto, named = (cache_mod.open(tmp_path / n) for n in ("torch", "auto", "named"))
    assert auto.meta["engine"] == chosen and auto.meta["summary"]["engine"] == chosen
    assert torch_cache.meta["summary"]["engine"] == "torch" and "engine" not in torch_cache.meta
    assert np.array_equal(auto.read("pooled"), named.read("pooled"))
    assert rel(auto.read("pooled"), torch_cache.read("pooled")) < 1e-5
    assert run("extract", *common, "--out", tmp_path / "auto", "--engine", "auto").exit_code == 0  # resumes: same choice

    result = run("extract", *common, "--out", tmp_path / "both", "--engine", "auto", "--streams", "pooled,fbank")
    assert result.exit_code == 0, result.output
    both = cache_mod.open(tmp_path / "both")
    assert "engine" not in both.meta and both.meta["summary"]["engine"] == "torch"
    assert np.array_equal(both.read("pooled"), torch_cache.read("pooled"))

    from mrlcache.models.matryoshka import MatryoshkaHead
    from mrlcache.models.model import save_model

    torch.manual_seed(0)
    backbone = load_backbone(str(tmp_path / "torch" / "backbone.pt"))
    save_model(tmp_path / "model.pt", MatryoshkaHead(backbone.pooled_dim, (8, 16)).eval(), backbone=backbone)
    for engine in ("auto", chosen):
        result = run("embed", "--model", tmp_path / "model.pt", tmp_path / "data", "--out", tmp_path / f"{engine}.npy",
                     "--engine", engine)
        assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(tmp_path / "auto.npy"), np.load(tmp_path / f"{chosen}.npy"))
