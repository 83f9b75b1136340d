"""ReDimNet architecture: parity with the reference tensors, structure of every variant, input and dtype rules.

The reference fixtures (produced by the authors' implementation) live outside the repository,
in ../shared/fixtures/redimnet or $MRLCACHE_REDIMNET_FIXTURES. When they are absent the
tests that need them fail (CI always has them), unless MRLCACHE_SKIP_MISSING_FIXTURES=1
asks to skip them (a checkout without the shared folder).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from mrlcache.models.loading import build_from_checkpoint
from mrlcache.models.redimnet import CONFIGS, DEFAULT_CONFIG, ConfigError, ReDimNet, resolve_config

FIXTURES = Path(os.environ.get("MRLCACHE_REDIMNET_FIXTURES",
                               Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "redimnet"))
SKIP_MISSING = os.environ.get("MRLCACHE_SKIP_MISSING_FIXTURES") == "1"
needs_fixtures = pytest.mark.skipif(SKIP_MISSING and not (FIXTURES / "b2.pt").is_file(),
                                    reason=f"ReDimNet reference fixtures not found in {FIXTURES}")

# A tiny configuration (fast) with strides 2 and 3, a conv_exp squeeze, fwSE blocks and a
# stage without time-context block; the published sizes are covered by the fixtures.
TINY = {
    "F": 12, "C": 4, "block_1d_type": "conv+att", "block_2d_type": "basic_resnet_fwse",
    "group_divisor": 2, "global_context_att": True,
    "stages_setup": [(1, 1, 1, [(3, 3)], None), (2, 1, 2, [(3, 3)], 4), (3, 1, 1, [(3, 3)], 4)],
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return ReDimNet(TINY).eval()


@pytest.fixture(scope="module")
def variants():
    if SKIP_MISSING and not (FIXTURES / "variants.json").is_file():
        pytest.skip(f"variants.json not found in {FIXTURES}")
    return json.loads((FIXTURES / "variants.json").read_text())


@pytest.fixture(scope="module")
def b2():
    ckpt = torch.load(FIXTURES / "b2.pt", weights_only=True)
    return build_from_checkpoint(ckpt, "b2.pt").eval()


@needs_fixtures
@pytest.mark.parametrize("inp", ["batch2", "single"])
def test_float32_outputs_match_reference(b2, inp):
    ref = torch.load(FIXTURES / "b2.ref.pt", weights_only=True)[inp]
    with torch.no_grad():
        mel = b2.features(ref["input"])
        frames = b2.backbone(mel)
        pooled = b2.pool(frames)
        embedding = b2.head(pooled)
        assert torch.equal(b2.pooled(ref["input"]), pooled)  # the API composes the same steps
        assert torch.equal(b2(ref["input"]), embedding)
    for name, got in [("mel", mel), ("backbone", frames), ("pooled", pooled), ("embedding", embedding)]:
        assert got.shape == ref[name].shape, name
        assert got.dtype == torch.float32
        assert rel_err(got, ref[name]) < 1e-5, name


@pytest.mark.parametrize("name", ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "M-att", "b2-mfa512"])
def test_state_dict_names_and_shapes_match_published(variants, name):
    entry = variants[name]
    model = ReDimNet(entry["model_config"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(entry["state_dict_shapes"].items())  # names, shapes and order
    assert model.pooled_dim == entry["pooled_dim"]
    assert sum(p.numel() for p in model.parameters()) == entry["params"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_named_configs_equal_published_configs(variants, name):
    assert resolve_config(CONFIGS[name]) == resolve_config(variants[name]["model_config"])


def test_absent_keys_take_the_documented_defaults(variants):
    # b2 uses the documented default for each of these keys: without them it must not change.
    documented = {"F": 72, "C": 16, "group_divisor": 4, "out_channels": None, "embed_dim": 192,
                  "hop_length": 160, "pooling_func": "ASTP", "feat_type": "pt", "emb_bn": False}
    entry = variants["b2"]
    config = {k: v for k, v in entry["model_config"].items() if k not in documented}
    assert all(entry["model_config"][k] == v for k, v in documented.items())
    model = ReDimNet(config)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == entry["state_dict_shapes"]
    assert {k: model.model_config[k] for k in documented} == documented


def test_tuple_and_list_stages_build_the_same_model():
    as_lists = dict(TINY, stages_setup=[[s, n, e, [list(k) for k in ks], r] for s, n, e, ks, r in TINY["stages_setup"]])
    torch.manual_seed(0)
    a = ReDimNet(TINY).state_dict()
    torch.manual_seed(0)
    b = ReDimNet(as_lists).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, message", [
    ({"dropout": 0.1}, "unknown model_config keys"),
    ({"feat_type": "tf"}, "feat_type"),
    ({"tf_optimized_arch": True}, "tf_optimized_arch"),
    ({"pooling_func": "TSTP"}, "pooling_func"),
    ({"block_2d_type": "resnext"}, "block_2d_type"),
    ({"spec_params": {"n_mfcc": 20}}, "spec_params"),
    ({"stages_setup": [(4, 1, 1, [(3, 3)], None)]}, "stride"),
])
def test_unsupported_configs_fail_clearly(change, message):
    with pytest.raises(ConfigError, match=message):
        ReDimNet(dict(TINY, **change))


def test_accepts_b_t_and_b_1_t_and_rejects_other_shapes():
    model = tiny_model()
    wave = torch.randn(2, 8000)
    with torch.no_grad():
        a, b = model(wave), model(wave.unsqueeze(1))
    assert a.shape == (2, 192) and torch.equal(a, b)
    assert model.features(wave).shape == (2, 12, 8000 // 160 + 1)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model.features(torch.randn(2, 2, 8000))


def test_batch_items_are_independent():
    # Eval mode: a clip's vector must not depend on what else is in the batch.
    model = tiny_model()
    wave = torch.randn(3, 6400)
    with torch.no_grad():
        together = model.pooled(wave)
        alone = torch.cat([model.pooled(wave[i:i + 1]) for i in range(3)])
    assert together.shape == (3, model.pooled_dim)
    assert torch.allclose(together, alone, rtol=1e-4, atol=1e-5)


@needs_fixtures
def test_features_stay_float32_under_autocast(b2):
    wave = torch.load(FIXTURES / "b2.ref.pt", weights_only=True)["batch2"]["input"]
    reference = b2.features(wave)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mel = b2.features(wave)
        pooled = b2.pooled(wave)
    assert mel.dtype == torch.float32 and torch.equal(mel, reference)
    # The rest of the network may run in bfloat16 and stays close to float32.
    with torch.no_grad():
        assert rel_err(pooled.float(), b2.pooled(wave)) < 5e-2


def test_features_ignore_input_dtype():
    model = tiny_model()
    wave = torch.randn(1, 4000)
    assert model.features(wave.double()).dtype == torch.float32
    assert torch.allclose(model.features(wave.double()), model.features(wave), atol=1e-4)


def test_default_config_is_the_reference_wrapper_default(variants):
    # M-att is the reference wrapper's default except for its 'att' blocks; the defaults agree.
    assert resolve_config(variants["M-att"]["model_config"]) == resolve_config({})
    assert DEFAULT_CONFIG["block_1d_type"] == "att"
