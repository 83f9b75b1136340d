"""Checkpoint loading: strictness, clear errors, half-precision weights, download cache, saving, random init."""

import hashlib
import io
import urllib.error

import pytest
import torch

from conftest import TINY, crafted_files
from test_redimnet import FIXTURES, needs_fixtures, rel_err

from mrlcache.backbone import loading
from mrlcache.backbone.loading import CheckpointError, load_backbone, save_checkpoint
from mrlcache.backbone.redimnet import ReDimNet


def write_checkpoint(path, config=TINY, state=None, seed=0):
    """Write a published-format file with random weights; returns the state_dict written."""
    if state is None:
        torch.manual_seed(seed)
        state = ReDimNet(config).state_dict()
    torch.save({"model_config": config, "state_dict": state}, path)
    return state


@pytest.fixture
def tiny_ckpt(tmp_path):
    path = tmp_path / "tiny.pt"
    write_checkpoint(path)
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache; any real network access fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(loading.urllib.request, "urlopen", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_loads_a_checkpoint_file_exactly(tiny_ckpt):
    state = torch.load(tiny_ckpt, weights_only=True)["state_dict"]
    model = load_backbone(str(tiny_ckpt))
    assert not model.training
    assert model.weights_sha256 == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.pooled_dim == 2 * TINY["F"] * TINY["C"] and model.embed_dim == 192


@pytest.mark.parametrize("damage, expected", [
    (lambda sd: sd.pop("linear.bias"), r"missing \(1\): linear\.bias"),
    (lambda sd: sd.__setitem__("bn.weight", torch.ones(7)), r"wrong shape \(1\): bn\.weight \(7,\)"),
    (lambda sd: sd.__setitem__("extra.weight", torch.ones(3)), r"unexpected \(1\): extra\.weight"),
])
def test_mismatching_state_dict_is_listed(tmp_path, damage, expected):
    state = write_checkpoint(tmp_path / "ok.pt")
    damage(state)
    write_checkpoint(tmp_path / "bad.pt", state=state)
    with pytest.raises(CheckpointError, match=expected) as info:
        load_backbone(tmp_path / "bad.pt")
    assert "bad.pt" in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"dropout": 0.1}, "unknown model_config keys"),
    ({"feat_type": "tf"}, "feat_type"),
    ({"tf_optimized_arch": True}, "tf_optimized_arch"),
])
def test_unsupported_config_in_a_file_names_the_file(tmp_path, change, message):
    state = write_checkpoint(tmp_path / "ok.pt")
    write_checkpoint(tmp_path / "odd.pt", config=dict(TINY, **change), state=state)
    with pytest.raises(CheckpointError, match=message) as info:
        load_backbone(tmp_path / "odd.pt")
    assert "odd.pt" in str(info.value)


def test_unknown_variant_name_lists_the_known_ones():
    with pytest.raises(CheckpointError, match=r"unknown ReDimNet variant 'b9'.*b0, b1.*S, M"):
        load_backbone("b9")


def test_missing_file():
    with pytest.raises(CheckpointError, match="no_such.pt: no such checkpoint file"):
        load_backbone("/nonexistent/no_such.pt")


def test_corrupt_truncated_and_foreign_files(tmp_path, tiny_ckpt):
    data = tiny_ckpt.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "corrupt.pt": bytes(range(256)) * 64,
        "text.pt": b"model_config: b2\n",
        "empty.pt": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name}: not a readable torch checkpoint"):
            load_backbone(tmp_path / name)
    # Valid torch files that are not checkpoints in the published format.
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"state_dict": {}}, tmp_path / "no_config.pt")
    for name in ("list.pt", "no_config.pt"):
        with pytest.raises(CheckpointError, match=f"{name}: not a ReDimNet checkpoint"):
            load_backbone(tmp_path / name)


def test_offline_without_cache_names_the_url_and_the_local_file_way(torch_home, monkeypatch):
    def offline(url, path):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(loading, "_download", offline)
    with pytest.raises(CheckpointError) as info:
        load_backbone("b2", train_type="ft_lm")
    message = str(info.value)
    assert "https://github.com/IDRnD/ReDimNet/releases/download/latest/b2-vox2-ft_lm.pt" in message
    assert "load_backbone('/path/to/b2-vox2-ft_lm.pt')" in message and "--weights PATH" in message
    assert not torch_home.exists() or not any(torch_home.iterdir())


def test_cached_file_is_used_without_network(torch_home, tiny_ckpt, monkeypatch):
    monkeypatch.setattr(loading, "_download", lambda url, path: pytest.fail("downloaded although cached"))
    torch_home.mkdir(parents=True)
    cached = torch_home / "b0-vox2-ptn.pt"
    cached.write_bytes(tiny_ckpt.read_bytes())
    model = load_backbone("b0")
    # The file's own config wins over the named b0 configuration.
    assert model.model_config["F"] == TINY["F"]
    assert model.weights_sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()


class FakeResponse(io.BytesIO):
    """urlopen() stand-in that can fail half-way through the body."""

    def __init__(self, data, fail_after=None):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise TimeoutError("connection reset")
        return super().read(min(n, 4096))


def test_download_is_atomic_and_loaded_from_the_cache(torch_home, tiny_ckpt, monkeypatch):
    data = tiny_ckpt.read_bytes()
    monkeypatch.setattr(loading.urllib.request, "urlopen", lambda url, timeout: FakeResponse(data, len(data) // 2))
    with pytest.raises(CheckpointError, match="b3-vox2-ptn.pt"):
        load_backbone("b3")
    assert not any(torch_home.iterdir())  # neither a half file under the final name nor a temp file

    seen = []
    monkeypatch.setattr(loading.urllib.request, "urlopen",
                        lambda url, timeout: seen.append(url) or FakeResponse(data))
    model = load_backbone("b3")
    assert seen == ["https://github.com/IDRnD/ReDimNet/releases/download/latest/b3-vox2-ptn.pt"]
    assert sorted(p.name for p in torch_home.iterdir()) == ["b3-vox2-ptn.pt"]
    assert (torch_home / "b3-vox2-ptn.pt").read_bytes() == data
    assert model.weights_sha256 == hashlib.sha256(data).hexdigest()
    load_backbone("b3")  # second time from the cache
    assert len(seen) == 1


@pytest.mark.slow  # runs the backbone on audio
@needs_fixtures
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_state_dicts_load_as_float32(tmp_path, dtype, tolerance):
    ckpt = torch.load(FIXTURES / "b2.pt", weights_only=True)
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save({"model_config": ckpt["model_config"], "state_dict": half}, tmp_path / "half.pt")
    model = load_backbone(tmp_path / "half.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = torch.load(FIXTURES / "b2.ref.pt", weights_only=True)["batch2"]
    with torch.no_grad():
        assert rel_err(model.pooled(ref["input"]), ref["pooled"]) < tolerance
        assert rel_err(model(ref["input"]), ref["embedding"]) < tolerance


@pytest.mark.slow  # runs the backbone on audio
def test_save_checkpoint_is_byte_deterministic_and_round_trips(tmp_path):
    model = load_backbone("b0", random_init=True, seed=3)
    assert model.weights_sha256 is None
    sha_a = save_checkpoint(model, tmp_path / "a.pt")
    sha_b = save_checkpoint(load_backbone("b0", random_init=True, seed=3), tmp_path / "sub" / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "sub" / "b.pt").read_bytes()
    assert sha_a == sha_b == model.weights_sha256 == hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "sub"]  # no temporary file left
    loaded = load_backbone(tmp_path / "a.pt")
    assert loaded.weights_sha256 == sha_a
    wave = torch.randn(1, 4800)
    with torch.no_grad():
        assert torch.equal(loaded(wave), model(wave))


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = load_backbone("b0", random_init=True, seed=1).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = load_backbone("b0", random_init=True, seed=1).state_dict()
    c = load_backbone("b0", random_init=True, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["linear.weight"], c["linear.weight"])
    # BatchNorm statistics keep their defaults.
    assert torch.equal(a["bn.running_var"], torch.ones_like(a["bn.running_var"]))


def test_random_init_needs_a_known_configuration():
    with pytest.raises(CheckpointError, match="random_init needs a variant"):
        load_backbone("M", random_init=True)


def test_package_level_entry_point(tiny_ckpt):
    import mrlcache

    assert mrlcache.load_backbone(tiny_ckpt).model_config["C"] == TINY["C"]


def test_a_checkpoint_carrying_code_is_refused_before_it_runs(tmp_path):
    torch.manual_seed(0)
    state = ReDimNet(TINY).state_dict()
    marker, files = crafted_files(tmp_path, lambda p: {"model_config": TINY, "state_dict": state, "x": p})
    for path in files:
        with pytest.raises(CheckpointError) as info:
            load_backbone(path)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{path}: refused")
        assert "names posix.system" in message and "could run code" in message
        assert isinstance(info.value, loading.UnsafeFileError)
    assert not marker.exists()


def test_backbone_bytes_are_the_saved_file_and_its_sha(tmp_path):
    torch.manual_seed(1)
    model = ReDimNet(TINY)
    data = loading.backbone_bytes(model)
    sha = save_checkpoint(model, tmp_path / "m.pt")
    assert (tmp_path / "m.pt").read_bytes() == data
    assert loading.state_sha256(model) == sha == hashlib.sha256(data).hexdigest()
    # The shared published fixture: saving it again reproduces its bytes' SHA-256 every time.
    if (FIXTURES / "b2.pt").is_file():
        b2 = load_backbone(FIXTURES / "b2.pt")
        again = save_checkpoint(b2, tmp_path / "b2.pt")
        assert loading.state_sha256(load_backbone(tmp_path / "b2.pt")) == again
        assert load_backbone(tmp_path / "b2.pt").weights_sha256 == again
