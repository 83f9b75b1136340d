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


def test_onnx_backbone_pooled_equals_torch_at_two_lengths_and_batches():
    from mrlcache.export import OnnxBackbone

    backbone = load_backbone("b0", random_init=True, seed=3)
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
