"""ECAPA-TDNN and CAM++ export: their own front ends trace to TorchScript and ONNX.

Tiny random configurations (the operations, not the widths, are what exporting checks).
CAM++ is checked through TorchScript only: its ONNX export (52 dense layers traced with a
dynamic length) takes minutes, too long for the test suite (docs/model.md).
"""

import numpy as np
import pytest
import torch

from mrlcache.backbone import campplus, ecapa_tdnn
from mrlcache.export import OnnxBackbone, export_model, verify_export
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import MRLModel

pytestmark = pytest.mark.slow

TINY_ECAPA = {"channels": [32, 32, 32, 32, 96], "attention_channels": 16, "res2net_scale": 4, "se_channels": 16,
              "lin_neurons": 24}
TINY_CAMPPLUS = {"growth_rate": 8, "bn_size": 2, "init_channels": 16, "embedding_size": 24}


def tiny(module, config, seed=0):
    torch.manual_seed(seed)
    backbone = module.build(config).eval()
    backbone.weights_sha256 = "0" * 64
    return backbone


def mrl(backbone):
    head = MatryoshkaHead(backbone.pooled_dim, (8, 16))
    return MRLModel(backbone, head, weights_sha256=backbone.weights_sha256).eval()


@pytest.mark.parametrize("module,config", [(ecapa_tdnn, TINY_ECAPA), (campplus, TINY_CAMPPLUS)])
def test_torchscript_export_equals_pytorch_at_two_lengths(module, config, tmp_path):
    model = mrl(tiny(module, config))
    path = export_model(model, tmp_path / "m.ts", format="torchscript")
    report = verify_export(path, model)
    assert report["passed"], report["errors"]


def test_onnx_export_and_engine_equal_pytorch_for_ecapa(tmp_path):
    pytest.importorskip("onnxruntime")
    backbone = tiny(ecapa_tdnn, TINY_ECAPA)
    model = mrl(backbone)
    report = verify_export(export_model(model, tmp_path / "m.onnx"), model)
    assert report["passed"], report["errors"]
    engine = OnnxBackbone(backbone)
    wave = 0.1 * torch.randn(3, 27111, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = backbone.pooled(wave).numpy()
    got = engine.pooled(wave).numpy()
    assert float(np.max(np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1))) < 1e-4


LAYERS_CAMPPLUS = {"growth_rate": 8, "bn_size": 2, "init_channels": 32, "embedding_size": 24}  # init = 4 growth:
# the last two transitions are equally wide (32 + 96 -> 64, 64 + 192 -> 128, 128 + 128 -> 128), as published


def layers_model(backbone, layers_pooled, tmp_path):
    """A fitted-looking Matryoshka model on the encoder's layers stream, saved and loaded."""
    from mrlcache import load_model, streams
    from mrlcache.models.model import save_model
    from mrlcache.models.streams import StreamModel, plan_groups

    record = streams.spec("layers").record(backbone, layers_pooled=layers_pooled, dtype="float16", crop_samples=None)
    torch.manual_seed(1)
    head = StreamModel(plan_groups(["layers"], {"layers": record}), "mrl", {"dims": [4, 8]}, encoder_dim=8)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return load_model(save_model(tmp_path / "model.pt", head.eval(), backbone=backbone))


@pytest.mark.parametrize("layers_pooled", [False, True])
def test_a_model_on_ecapa_layers_exports_and_equals_load_model(layers_pooled, tmp_path):
    pytest.importorskip("onnxruntime")
    model = layers_model(tiny(ecapa_tdnn, TINY_ECAPA), layers_pooled, tmp_path)
    assert model.inputs == ("layers",)
    for fmt in ("onnx", "torchscript"):
        report = verify_export(export_model(model, tmp_path / f"m.{fmt}", format=fmt), model)
        assert report["passed"], (fmt, report["errors"])


def test_a_model_on_campplus_layers_exports_and_equals_load_model(tmp_path):
    model = layers_model(tiny(campplus, LAYERS_CAMPPLUS), False, tmp_path)
    report = verify_export(export_model(model, tmp_path / "m.ts", format="torchscript"), model)
    assert report["passed"], report["errors"]
