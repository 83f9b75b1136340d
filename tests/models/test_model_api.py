"""The deployable model: project(cached vectors) == forward(audio), save/load round trips."""

import numpy as np
import pytest
import torch
from conftest import crafted_files, speech_like

from mrlcache import cache, load_model
from mrlcache.corpus import Utterance
from mrlcache.backbone import BackboneRecord, CheckpointError
from mrlcache.backbone.loading import load_backbone, save_checkpoint
from mrlcache.fit import fit
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import ModelError

DIMS = (16, 32)
SPEAKERS, UTTS = 4, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random b0, its weights beside a 1-view cache of its pooled vectors, and a fit."""
    root = tmp_path_factory.mktemp("model")
    backbone = load_backbone("b0", random_init=True, seed=3)
    cache_dir = root / "cache"
    sha = save_checkpoint(backbone, root / "backbone.pt")  # moved beside the cache, as extract does
    waves = np.stack([speech_like(0.5, seed=10 * s + u, f0=90.0 + 30 * s)
                      for s in range(SPEAKERS) for u in range(UTTS)])  # (N, T)
    with torch.no_grad():
        pooled = backbone.pooled(torch.from_numpy(waves)).numpy()  # (N, pooled_dim)
    manifest = [Utterance(f"id{s:05d}/v/{u:05d}.wav", f"/none/{s}-{u}.wav", f"id{s:05d}")
                for s in range(SPEAKERS) for u in range(UTTS)]
    meta = {"model_config": backbone.model_config, "pooled_dim": backbone.pooled_dim,
            "backbone": BackboneRecord.random_init("b0", sha).to_dict(),
            "sample_rate": 16000, "mode": "train", "crop_seconds": 0.5, "views": 1, "augment": {},
            "seed": 0, "dtype": "float32", "shard_size": 100}
    with cache.CacheWriter(cache_dir, meta, manifest) as writer:
        writer.write_shard(0, list(range(len(manifest))), pooled[:, None], {}, seconds=0.0)
        writer.finish()
    (root / "backbone.pt").rename(cache_dir / "backbone.pt")
    run = fit(cache_dir, DIMS, root / "run", epochs=2, batch_size=4, val_speakers=0, progress=False)
    return root, cache_dir, run, waves, pooled, sha


@pytest.mark.slow  # the setup runs the backbone on audio
def test_project_on_cached_vectors_equals_forward_on_audio(setup):
    root, cache_dir, run, waves, pooled, sha = setup
    model = load_model(run / "model.pt")
    assert model.dims == DIMS and model.weights_sha256 == sha
    cached = cache.open(cache_dir).read("pooled", view=0)
    projected = model.project(cached)  # numpy in, numpy out
    assert isinstance(projected, np.ndarray) and projected.shape == (len(waves), 32)
    with torch.no_grad():
        wave = torch.from_numpy(waves)
        emb = model(wave)
        per_dim = model.embed_all(wave)
        torch.testing.assert_close(emb, torch.from_numpy(projected), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(wave, dim=16), emb[:, :16])
        torch.testing.assert_close(model.project(torch.from_numpy(cached), dim=16), emb[:, :16])
    assert set(per_dim) == set(DIMS)
    for d in DIMS:
        torch.testing.assert_close(per_dim[d], emb[:, :d])
    with pytest.raises(ValueError, match="trained for dims"):
        model.project(cached, dim=24)


@pytest.mark.slow  # the setup runs the backbone on audio
def test_head_is_the_best_checkpoint_and_round_trips(setup, tmp_path):
    from mrlcache.models.model import save_model

    root, cache_dir, run, waves, pooled, sha = setup
    model = load_model(run / "model.pt")
    best = torch.load(run / "best.pt", weights_only=True)["head"]
    for k, v in best.items():
        torch.testing.assert_close(model.head.state_dict()[k], v)
    save_model(tmp_path / "again.pt", model.head, backbone=model.backbone)
    again = load_model(tmp_path / "again.pt")
    np.testing.assert_array_equal(again.project(pooled), model.project(pooled))
    assert again.weights_sha256 == sha


@pytest.mark.slow  # the setup runs the backbone on audio
def test_referenced_backbone_is_checked_by_sha(setup, tmp_path):
    root, cache_dir, run, waves, pooled, sha = setup
    ref = fit(cache_dir, DIMS, tmp_path / "ref", epochs=1, batch_size=4, val_speakers=0, progress=False,
              embed_backbone=False)
    entry = torch.load(ref / "model.pt", weights_only=True)["backbone"]
    assert "state_dict" not in entry and entry["sha256"] == sha
    # The record of the backbone it refers to: the weights extract saved beside the cache.
    assert entry == {"source": str((cache_dir / "backbone.pt").resolve()), "train_type": None, "dataset": None,
                     "sha256": sha}
    model = load_model(ref / "model.pt")
    assert model.weights_sha256 == sha
    np.testing.assert_allclose(model.project(pooled), load_model(ref / "model.pt").project(pooled))
    # Other weights under the referenced path: refused.
    save_checkpoint(load_backbone("b0", random_init=True, seed=4), tmp_path / "other.pt")
    obj = torch.load(ref / "model.pt", weights_only=True)
    obj["backbone"]["source"] = str(tmp_path / "other.pt")
    torch.save(obj, tmp_path / "swapped.pt")
    with pytest.raises(ModelError, match="SHA-256"):
        load_model(tmp_path / "swapped.pt")


@pytest.mark.slow  # the setup runs the backbone on audio
def test_load_model_errors(setup, tmp_path):
    root, cache_dir, *_ = setup
    with pytest.raises(ModelError, match="not an mrlcache model file.*load_backbone"):
        load_model(cache_dir / "backbone.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="not a model file"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(ModelError, match="no such model file"):
        load_model(tmp_path / "missing.pt")


@pytest.mark.slow  # the setup runs the backbone on audio
def test_fit_refuses_a_backbone_that_is_not_the_caches(setup, tmp_path):
    root, cache_dir, *_ = setup
    save_checkpoint(load_backbone("b0", random_init=True, seed=5), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="extracted with"):
        fit(cache_dir, DIMS, tmp_path / "x", epochs=1, batch_size=4, val_speakers=0, progress=False,
            weights=str(tmp_path / "other.pt"))


@pytest.mark.slow  # runs the backbone on audio
def test_numpy_waves_give_numpy_embeddings_equal_to_torch():
    import numpy as np

    from mrlcache.models.matryoshka import MatryoshkaHead
    from mrlcache.models.model import MRLModel
    from mrlcache.backbone.loading import load_backbone

    backbone = load_backbone("b0", random_init=True, seed=1)
    torch.manual_seed(0)
    model = MRLModel(backbone, MatryoshkaHead(backbone.pooled_dim, [8, 16]).eval(), dims=[8, 16]).eval()
    wave = np.random.default_rng(0).standard_normal((2, 8000)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(wave), dim=8).numpy()
    got = model(wave, dim=8)
    assert isinstance(got, np.ndarray) and got.shape == (2, 8)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    all_dims = model.embed_all(wave)
    assert sorted(all_dims) == [8, 16] and isinstance(all_dims[16], np.ndarray)
    np.testing.assert_allclose(all_dims[8], expected, rtol=1e-6, atol=1e-6)


def _crafted_model(tmp_path):
    """A model.pt whose unpickling would create ``tmp_path/ran`` (what a file carrying code does)."""
    head = MatryoshkaHead(8, [4, 8])
    obj = {"format": "mrlcache-model", "version": 1, "dims": [4, 8], "pooled_dim": 8,
           "head_state": head.state_dict()}
    marker, files = crafted_files(tmp_path, lambda payload: {**obj, "backbone": payload})
    return marker, files[0]


def test_a_model_file_carrying_code_is_refused_before_it_runs(tmp_path):
    marker, evil = _crafted_model(tmp_path)
    with pytest.raises(ModelError) as info:
        load_model(evil)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{evil}: refused") and "names posix.system" in message
    assert not marker.exists()


@pytest.mark.slow  # a full command
def test_eer_refuses_a_model_file_carrying_code(tmp_path):
    from click.testing import CliRunner

    from mrlcache.cli import main

    marker, evil = _crafted_model(tmp_path)
    (tmp_path / "trials.txt").write_text("1 a/x.wav b/y.wav\n")
    (tmp_path / "cache").mkdir()
    result = CliRunner().invoke(main, ["eer", "--model", str(evil), "--trials", str(tmp_path / "trials.txt"),
                                       "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {evil}: refused") and "could run code" in lines[0]
    assert "Traceback" not in result.output
    assert not marker.exists()
