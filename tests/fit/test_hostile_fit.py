"""Hostile fits: a damaged or crafted last.pt on --resume, a loss gone NaN, one speaker.

Each is one FitError line naming the file or the cause (the CLI prints it as one line),
and a NaN stops the fit with the last good checkpoint kept.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from test_fit import DIMS, FAST, write_synth_cache

from mrlcache.cli import main
from mrlcache.fit import FitError, fit
from mrlcache.fit import loop

OPTS = dict(FAST, epochs=2, seed=3)


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-fit")
    write_synth_cache(root / "train", n_spk=16, utts=4, views=2, seed=1)
    return root / "train"


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _one_epoch_run(train, out):
    return fit(train, DIMS, out, **dict(OPTS, epochs=1))


@pytest.mark.parametrize("damage, message", [
    ("pickle", "could run code|refused"),
    ("truncated", "truncated or foreign"),
    ("inconsistent", "does not match this run"),
    ("not-a-dict", "not a checkpoint of mrlcache fit"),
])
def test_resume_from_a_bad_last_pt_is_one_line(train, tmp_path, damage, message):
    run = _one_epoch_run(train, tmp_path / "run")
    last = run / "last.pt"
    marker = tmp_path / "pwned"
    if damage == "pickle":
        torch.save({"epoch": 1, "head": _Payload(marker)}, last)
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "inconsistent":
        state = torch.load(last, weights_only=True)
        state["head"] = {"weight": torch.zeros(3)}
        torch.save(state, last)
    else:
        torch.save([1, 2, 3], last)
    with pytest.raises(FitError, match=message):
        fit(train, DIMS, run, resume=True, **OPTS)
    assert not marker.exists()
    if damage == "pickle":  # the command line prints it as one line, no traceback
        result = CliRunner().invoke(main, ["fit", "--cache", str(train), "--out", str(run), "--resume",
                                           "--dims", ",".join(map(str, DIMS)), "--epochs", "2", "--seed", "3",
                                           "--batch-size", "32", "--lr", "1e-2", "--warmup-epochs", "1",
                                           "--margin-warmup-epochs", "2", "--scale", "16", "--head-only"])
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output and not marker.exists()


def test_a_loss_gone_nan_stops_and_keeps_the_last_good_checkpoint(train, tmp_path, monkeypatch):
    real = loop._optimizer_step
    steps = {"n": 0}

    def diverging(job, scaler):  # the weights blow up in the second epoch, as with a huge --lr
        real(job, scaler)
        steps["n"] += 1
        if steps["n"] > job.steps_per_epoch:  # one optimiser step per batch (no --grad-accum)
            with torch.no_grad():
                loop._trained(job)[0].fill_(float("nan"))

    monkeypatch.setattr(loop, "_optimizer_step", diverging)
    with pytest.raises(FitError, match=r"epoch 2: the training loss or the weights became NaN or Inf; stopped, "
                                       r".*last\.pt is kept as the last good checkpoint; lower --lr"):
        fit(train, DIMS, tmp_path / "run", **dict(OPTS, epochs=3))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 1  # epoch 1's checkpoint, not the NaN one
    assert all(torch.isfinite(v).all() for v in state["head"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.slow
def test_an_unfrozen_backbone_gets_its_own_sha256(tmp_path):
    """A model whose backbone was trained must not match caches of the weights it started from."""
    from conftest import make_tree

    from mrlcache.backbone.loading import load_backbone
    from mrlcache.fit import fit_end_to_end
    from mrlcache.model import load_model

    data = tmp_path / "data"
    make_tree(data, speakers=3, videos=2, utts=2, seconds=1.0)
    run = fit_end_to_end(data, (16, 32), tmp_path / "run", views=1, epochs=1, unfreeze_after=0, backbone_lr=1e-2,
                         variant="b0", random_init=True, crop_seconds=0.5, batch_size=4, lr=1e-2, val_speakers=0,
                         margin_warmup_epochs=0, scale=16, progress=False)
    start = load_backbone(str(run / "backbone.pt"))
    model = load_model(run / "model.pt")
    assert start.weights_sha256 and model.weights_sha256 and model.weights_sha256 != start.weights_sha256


def test_a_validation_cache_from_another_backbone_is_refused(train, tmp_path):
    from test_fit import POOLED, synth_vectors

    from mrlcache import cache
    from mrlcache.corpus import Utterance

    pooled, spk = synth_vectors(4, 3, 1, seed=2)
    manifest = [Utterance(f"v{s}/x/{i}.wav", f"/none/{i}.wav", f"v{s}") for i, s in enumerate(spk)]
    meta = {"model_config": {"synthetic": True}, "weights_sha256": "1" * 64, "pooled_dim": POOLED,
            "sample_rate": 16000, "mode": "eval", "views": 1, "augment": {}, "seed": 0, "dtype": "float32",
            "shard_size": 64}
    with cache.CacheWriter(tmp_path / "val", meta, manifest) as writer:
        writer.write_shard(0, list(range(len(spk))), pooled, {}, seconds=0.0)
        writer.finish()
    (tmp_path / "trials.txt").write_text(f"1 {manifest[0].utt_id} {manifest[1].utt_id}\n"
                                         f"0 {manifest[0].utt_id} {manifest[4].utt_id}\n")
    with pytest.raises(FitError, match=r"--val-cache .*: its vectors come from backbone 111111111111\.\.\., the "
                                       r"training cache's from 000000000000\.\.\.; extract the validation audio"):
        fit(train, DIMS, tmp_path / "run", val_cache=str(tmp_path / "val"), val_trials=str(tmp_path / "trials.txt"),
            **OPTS)


def test_a_fit_on_one_speaker_is_one_line(tmp_path):
    write_synth_cache(tmp_path / "one", n_spk=1, utts=4, views=2, seed=1)
    with pytest.raises(FitError, match=r"1 speaker\(s\) \('id00000'\); a speaker classifier needs at least 2"):
        fit(tmp_path / "one", DIMS, tmp_path / "run", **OPTS)


def test_fixed_baselines_on_streams_is_refused_not_ignored(train, tmp_path):
    with pytest.raises(FitError, match=r"--fixed-baselines fits fixed-size heads on the pooled vector only; "
                                       r"with --inputs fbank none would be fitted"):
        fit(train, DIMS, tmp_path / "run", inputs=("fbank",), fixed_baselines=True, **OPTS)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cache_ptm, refused", [("a" * 64, False), ("b" * 64, True), (None, True)])
def test_a_model_fitted_on_one_ptm_refuses_a_cache_of_another(tmp_path, cache_ptm, refused):
    from test_fit import POOLED, synth_vectors

    from mrlcache import cache
    from mrlcache.corpus import Utterance
    from mrlcache.evaluate import EvaluateError, open_cache_for
    from mrlcache.models.matryoshka import MatryoshkaHead
    from mrlcache.models.model import load_model, save_model

    pooled, spk = synth_vectors(2, 2, 1, seed=2)
    manifest = [Utterance(f"v{s}/x/{i}.wav", f"/none/{i}.wav", f"v{s}") for i, s in enumerate(spk)]
    meta = {"model_config": {"synthetic": True}, "weights_sha256": "0" * 64, "pooled_dim": POOLED,
            "sample_rate": 16000, "mode": "eval", "views": 1, "augment": {}, "seed": 0, "dtype": "float32",
            "shard_size": 64}
    if cache_ptm:
        meta["ptm"] = {"name": "other-ptm" if refused else "wavlm-x", "source": "hub", "sha256": cache_ptm}
    with cache.CacheWriter(tmp_path / "c", meta, manifest) as writer:
        writer.write_shard(0, list(range(len(spk))), pooled, {}, seconds=0.0)
        writer.finish()
    save_model(tmp_path / "model.pt", MatryoshkaHead(POOLED, DIMS), ptm={"name": "wavlm-x", "sha256": "a" * 64})
    model = load_model(tmp_path / "model.pt")
    assert model.ptm == {"name": "wavlm-x", "sha256": "a" * 64}
    if refused:
        with pytest.raises(EvaluateError, match=r"the model was fitted on wavlm-x \(aaaaaaaaaaaa\); extract it "
                                                r"with --ptm wavlm-x"):
            open_cache_for(tmp_path / "c", model)
    else:
        assert open_cache_for(tmp_path / "c", model).path is not None


def test_the_output_guard_knows_every_file_of_a_run(train, tmp_path):
    from mrlcache.paths import RUN_FILES

    run = fit(train, DIMS, tmp_path / "run", fixed_baselines=True, **dict(OPTS, epochs=1))
    assert {p.name for p in run.iterdir()} <= set(RUN_FILES)
