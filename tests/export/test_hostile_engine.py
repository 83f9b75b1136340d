"""The cached onnxruntime engine against hostile caches and short waves (issue 19 item 3).

A cached graph of another model under this model's key (its record forged to match) is
refused in one line by the check against the torch backbone, not a broadcasting traceback;
the new encoders' engines run down to each encoder's shortest wave and equal torch there.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # one ONNX export per encoder (about 20 s each on the development CPU)

from mrlcache.backbone.registry import encoder_module  # noqa: E402
from mrlcache.export.engine import OnnxBackbone  # noqa: E402
from mrlcache.export.formats import ExportError  # noqa: E402

SMALL = {
    "ecapa-tdnn": {"channels": [16, 16, 16, 16, 48], "attention_channels": 8, "se_channels": 8,
                   "res2net_scale": 4, "lin_neurons": 8},
    "campplus": {"growth_rate": 8, "bn_size": 2, "init_channels": 16, "embedding_size": 8},
}


def built(name):
    torch.manual_seed(0)
    model = encoder_module(name).build(SMALL[name]).eval()
    model.weights_sha256 = hashlib.sha256(name.encode()).hexdigest()
    return model


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Each encoder's engine, exported once into its own cache folder."""
    root = tmp_path_factory.mktemp("engines")
    return {name: (built(name), OnnxBackbone(built(name), cache_dir=root / name), root / name) for name in SMALL}


def test_another_models_graph_under_a_forged_record_is_refused_in_one_line(engines, tmp_path):
    import shutil

    ecapa, _, folder = engines["ecapa-tdnn"]
    shutil.copytree(folder, tmp_path / "mine")
    (graph,) = (tmp_path / "mine").glob("*.onnx")
    (other,) = engines["campplus"][2].glob("*.onnx")
    graph.write_bytes(other.read_bytes())
    record = graph.with_suffix(".json")
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({**saved, "sha256": hashlib.sha256(graph.read_bytes()).hexdigest()}))
    with pytest.raises(ExportError, match="the onnxruntime engine differs from the torch backbone") as err:
        OnnxBackbone(ecapa, cache_dir=tmp_path / "mine")
    assert "\n" not in str(err.value) and "use --engine torch" in str(err.value)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_engine_runs_at_the_encoders_shortest_wave(name, engines):
    model, engine, _ = engines[name]
    assert engine.min_samples == model.min_samples
    wave = 0.1 * torch.randn(1, model.min_samples, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.pooled(wave)
    got = engine.pooled(wave)
    assert torch.isfinite(got).all()
    assert ((got - want).norm() / want.norm()).item() < 1e-4
