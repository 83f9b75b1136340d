"""Fitting the head on a synthetic cache with known speaker structure."""

import json

import numpy as np
import pytest
import torch
import yaml

from mrlcache import cache
from mrlcache.corpus import Utterance
from mrlcache.fit import FitError, fit
from mrlcache.fit.validate import heldout_trials

POOLED = 48
DIMS = (4, 8, 16, 32)
FAST = dict(epochs=12, batch_size=32, lr=1e-2, warmup_epochs=1, margin_warmup_epochs=2, scale=16,
            head_only=True, progress=False)


def synth_vectors(n_spk, utts, views, seed, rank=6):
    """Vectors = speaker centroid in a `rank`-dim subspace + strong per-utterance nuisance in
    another subspace + a large common offset + small per-view noise.

    Raw cosine suffers from the offset and the nuisance; a linear head can remove both.
    Returns (pooled (N, V, D) float32, speaker index per row (N,)).
    """
    rng = np.random.default_rng(1234)  # the same geometry for train and validation speakers
    basis = np.linalg.qr(rng.standard_normal((POOLED, POOLED)))[0]
    spk_basis, nuis_basis = basis[:, :rank], basis[:, rank:rank + 12]
    offset = 4.0 * rng.standard_normal(POOLED)
    rng = np.random.default_rng(seed)
    centroids = 2.0 * rng.standard_normal((n_spk, rank)) @ spk_basis.T
    spk = np.repeat(np.arange(n_spk), utts)
    nuisance = 2.5 * rng.standard_normal((len(spk), 12)) @ nuis_basis.T
    noise = 0.4 * rng.standard_normal((len(spk), views, POOLED))
    pooled = centroids[spk][:, None] + nuisance[:, None] + offset + noise
    return pooled.astype(np.float32), spk


def write_synth_cache(out, n_spk, utts=6, views=3, seed=0, first_spk=0, shard_size=64):
    pooled, spk = synth_vectors(n_spk, utts, views, seed)
    manifest = [Utterance(f"id{first_spk + s:05d}/v/{i:05d}.wav", f"/none/{i}.wav", f"id{first_spk + s:05d}")
                for i, s in enumerate(spk)]
    meta = {"model_config": {"synthetic": True}, "weights_sha256": "0" * 64, "pooled_dim": POOLED,
            "sample_rate": 16000, "mode": "train", "crop_seconds": 2.0, "views": views, "augment": {},
            "seed": seed, "dtype": "float32", "shard_size": shard_size}
    with cache.CacheWriter(out, meta, manifest) as writer:
        for k in range(writer.num_shards):
            rows = list(writer.shard_rows(k))
            writer.write_shard(k, rows, pooled[rows], {}, seconds=0.0)
        writer.finish()
    return manifest, spk


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    write_synth_cache(root / "train", n_spk=64, utts=8, views=3, seed=1)
    manifest, spk = write_synth_cache(root / "val", n_spk=12, utts=5, views=1, seed=2, first_spk=100)
    e, t, lab = heldout_trials(spk, 10_000, seed=0)
    (root / "trials.txt").write_text(
        "".join(f"{l} {manifest[a].utt_id} {manifest[b].utt_id}\n" for a, b, l in zip(e, t, lab)))
    return root


def read_history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_head_beats_raw_cosine_on_unseen_speakers(caches, tmp_path):
    run = fit(caches / "train", DIMS, tmp_path / "run", val_cache=str(caches / "val"),
              val_trials=str(caches / "trials.txt"), **FAST)
    summary = json.loads((run / "summary.json").read_text())
    eers = summary["best"]["eer"]
    raw = summary["raw_eer"]
    assert raw > 0.10  # the nuisance really hurts raw cosine
    for d in DIMS[1:]:  # dim 4 < the 6-dim speaker subspace: judged only against longer dims
        assert eers[str(d)] < 0.5 * raw, (d, eers, raw)
    # A shorter prefix is no better than a longer one beyond noise.
    for a, b in zip(DIMS, DIMS[1:]):
        assert eers[str(a)] >= eers[str(b)] - 0.03, eers
    hist = read_history(run)
    assert len(hist) == FAST["epochs"]
    assert [h["margin"] for h in hist[:3]] == pytest.approx([0.0, 0.1, 0.2])
    assert set(hist[0]["val_eer"]) == {str(d) for d in DIMS}
    for name in ("config.yaml", "fingerprint.json", "last.pt", "best.pt", "model.pt"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    fp = json.loads((run / "fingerprint.json").read_text())
    assert fp["weights_sha256"] == "0" * 64 and fp["utterances"] == 64 * 8


def test_sampled_class_softmax_separates_unseen_speakers_deterministically(caches, tmp_path):
    opts = dict(FAST, class_sample=0.25, val_cache=str(caches / "val"), val_trials=str(caches / "trials.txt"))
    runs = [fit(caches / "train", DIMS, tmp_path / f"r{i}", **opts) for i in range(2)]
    summary = json.loads((runs[0] / "summary.json").read_text())
    for d in DIMS[1:]:
        assert summary["best"]["eer"][str(d)] < 0.5 * summary["raw_eer"], summary
    assert read_history(runs[0])[-1]["loss"] == read_history(runs[1])[-1]["loss"]
    full = fit(caches / "train", DIMS, tmp_path / "full", **dict(opts, class_sample=1.0, epochs=1))
    # 16 of 64 classes per step: the sampled loss is the smaller one at the same point.
    assert read_history(runs[0])[0]["loss"][str(DIMS[-1])] < read_history(full)[0]["loss"][str(DIMS[-1])]
    with pytest.raises(FitError, match="--class-sample 0.0: must be a finite number > 0"):
        fit(caches / "train", DIMS, tmp_path / "bad", **dict(FAST, class_sample=0.0))


def test_same_seed_same_fit_and_other_seed_differs(caches, tmp_path):
    opts = dict(FAST, epochs=2)
    runs = [fit(caches / "train", DIMS, tmp_path / f"r{i}", seed=s, **opts) for i, s in enumerate((3, 3, 4))]
    heads = [torch.load(r / "last.pt", weights_only=True)["head"] for r in runs]
    for k in heads[0]:
        assert torch.equal(heads[0][k], heads[1][k]), k
    assert not torch.equal(heads[0]["linear.weight"], heads[2]["linear.weight"])
    assert read_history(runs[0])[-1]["loss"] == read_history(runs[1])[-1]["loss"]


def test_resume_continues_and_matches_uninterrupted(caches, tmp_path):
    opts = dict(FAST, epochs=4, seed=5)
    # A finished 2-epoch fit, extended to 4 epochs: resume continues the count and history.
    part = fit(caches / "train", DIMS, tmp_path / "part", **dict(opts, epochs=2))
    assert len(read_history(part)) == 2
    with pytest.raises(FitError, match="already holds a fit"):
        fit(caches / "train", DIMS, tmp_path / "part", **opts)
    with pytest.raises(FitError, match="options differ.*margin"):
        fit(caches / "train", DIMS, tmp_path / "part", resume=True, **dict(opts, margin=0.3))
    fit(caches / "train", DIMS, tmp_path / "part", resume=True, **opts)
    hist = read_history(part)
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert torch.load(part / "last.pt", weights_only=True)["epoch"] == 4


@pytest.mark.parametrize("class_sample", [1.0, 0.5])
def test_interrupted_fit_resumes_bit_identical(caches, tmp_path, monkeypatch, class_sample):
    opts = dict(FAST, epochs=3, seed=6, class_sample=class_sample)
    full = fit(caches / "train", DIMS, tmp_path / "full", **opts)
    import mrlcache.fit.loop as fit_mod

    real = fit_mod._log_tensorboard
    calls = {"n": 0}

    def crash_after_two(writer, rec, dims):  # raised after epoch 2's history line
        real(writer, rec, dims)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(fit_mod, "_log_tensorboard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        fit(caches / "train", DIMS, tmp_path / "cut", **opts)
    monkeypatch.setattr(fit_mod, "_log_tensorboard", real)
    # The crash hit before last.pt of epoch 2: resume redoes epoch 2 and drops its stale line.
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    fit(caches / "train", DIMS, tmp_path / "cut", resume=True, **opts)
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k in a["head"]:
        assert torch.equal(a["head"][k], b["head"][k]), k
    ha, hb = read_history(full), read_history(tmp_path / "cut")
    assert [h["epoch"] for h in hb] == [0, 1, 2]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert [h["val_eer"] for h in ha] == [h["val_eer"] for h in hb]


@pytest.mark.parametrize("group, pass_rows", [(None, None), (None, 40), (2, None), (2, 70)])
def test_memory_and_streamed_features_give_the_same_batches(caches, group, pass_rows):
    """One container, two reading policies: the same epoch is the same batches, each training
    row once with one of its cached views, whether held in memory or read pass by pass
    (``pass_rows``: rows one read holds; the shuffle ``group`` alone sets the order)."""
    from mrlcache.fit.data import Features

    c = cache.open(caches / "train")
    assert len(c.shards) > 2
    labels = np.arange(len(c.utterances)) % 7
    labels[::10] = -1  # held-out rows never appear
    records = {"pooled": c.streams["pooled"]}
    batches = {}
    for policy in ("memory", "streamed"):
        feats = Features(c, records, labels, np.float16, policy, group, pass_rows)
        batches[policy] = [(x["pooled"].clone(), y) for x, y in feats.epoch(seed=0, epoch=3, batch_size=32,
                                                                             device="cpu")]
    assert len(batches["memory"]) == len(batches["streamed"])
    for (xm, ym), (xs, ys) in zip(batches["memory"], batches["streamed"]):
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
    x = torch.cat([b[0] for b in batches["streamed"]]).numpy()
    y = torch.cat([b[1] for b in batches["streamed"]]).numpy()
    assert len(y) == (labels >= 0).sum()
    flat = c.read("pooled", dtype=np.float16).astype(np.float32).reshape(-1, c.dim)
    match = (np.abs(flat[None, :, :] - x[:, None, :]).max(-1) == 0)
    hits = match.argmax(1) // c.num_views
    assert match.any(1).all()
    assert sorted(hits.tolist()) == np.flatnonzero(labels >= 0).tolist()
    assert (labels[hits] == y).all()


def test_passes_hold_runs_of_whole_batches():
    from mrlcache.fit.data import passes

    batches = [np.arange(i, i + 3) for i in range(0, 21, 3)]  # 7 batches of 3 rows
    assert [len(r) for r in passes(batches, 7)] == [2, 2, 2, 1]
    assert [len(r) for r in passes(batches, 2)] == [1] * 7  # one batch at least
    assert [len(r) for r in passes(batches, None)] == [7]
    assert np.array_equal(np.concatenate([b for r in passes(batches, 7) for b in r]), np.arange(21))


def test_a_budget_below_the_need_reads_passes_of_64_mb(caches):
    """Exceeded anyway (and said), a tiny budget does not make an epoch read the cache once per batch."""
    from mrlcache.fit.memory import plan_features

    c = cache.open(caches / "train")
    plan = plan_features(c, {"pooled": c.streams["pooled"]}, np.float16, 32, 0, 1e-5)
    assert (plan.policy, plan.pass_rows, plan.passes) == ("streamed", None, 1)
    assert plan.shortfall().startswith("note: --memory-gb 1e-05 is below what this fit needs")


def weights(run):
    return torch.load(run / "last.pt", weights_only=True)["head"]


@pytest.mark.parametrize("shuffle_gb", [64.0, 4e-5])  # one group; groups of 2 shards (18 KB each, 147 KB in all)
def test_a_streamed_fit_in_several_passes_is_the_fit_in_memory(caches, tmp_path, shuffle_gb, capsys, monkeypatch):
    """The order depends on the seed and --shuffle-gb, never on --memory-gb: a budget too
    small for the cache (every batch its own read) gives the losses, EERs and weights of the
    fit holding it in memory, and says in one line that it is below what the fit needs (passes
    read only their own rows, so many passes are no reason for another line)."""
    monkeypatch.setattr("mrlcache.fit.memory.SHORT_PASS_BYTES", 0)  # below the need: one batch per pass
    opts = dict(FAST, epochs=2, shuffle_gb=shuffle_gb)
    memory = fit(caches / "train", DIMS, tmp_path / "memory", **opts)
    streamed = fit(caches / "train", DIMS, tmp_path / "streamed", memory_gb=1e-5, **opts)
    plan = json.loads((streamed / "summary.json").read_text())["memory"]
    assert plan["policy"] == "streamed" and plan["passes_per_epoch"] > 3 and plan["pass_rows"] == 32
    assert json.loads((memory / "summary.json").read_text())["memory"]["policy"] == "memory"
    assert plan["shuffle_group_shards"] == (None if shuffle_gb > 1 else 2)
    err = capsys.readouterr().err
    assert "--memory-gb 1e-05 is below what this fit needs" in err
    assert "reads the cache" not in err
    a, b = read_history(memory), read_history(streamed)
    assert [h["loss"] for h in a] == [h["loss"] for h in b]
    assert [h["val_eer"] for h in a] == [h["val_eer"] for h in b]
    wa, wb = weights(memory), weights(streamed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_streamed_fit_runs_under_a_tiny_memory_budget(caches, tmp_path):
    run = fit(caches / "train", DIMS, tmp_path / "s", memory_gb=1e-5, **dict(FAST, epochs=2))
    assert json.loads((run / "summary.json").read_text())["features"] == "streamed"


def test_bad_options_fail_clearly(caches, tmp_path):
    with pytest.raises(FitError, match="increasing"):
        fit(caches / "train", (32, 16), tmp_path / "a", **FAST)
    with pytest.raises(FitError, match="exceeds the cached pooled size"):
        fit(caches / "train", (64, 128), tmp_path / "b", **FAST)
    with pytest.raises(FitError, match="no such directory"):
        fit(tmp_path / "nope", DIMS, tmp_path / "c", **FAST)
    with pytest.raises(FitError, match="both"):
        fit(caches / "train", DIMS, tmp_path / "d", val_cache=str(caches / "val"), **FAST)
    from mrlcache.backbone import CheckpointError as ModelError  # what backbone_for_cache raises

    with pytest.raises(ModelError, match="names no backbone weights"):
        fit(caches / "train", DIMS, tmp_path / "e", **dict(FAST, head_only=False))


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from conftest import make_tree

    root = tmp_path_factory.mktemp("e2e")
    make_tree(root, speakers=3, videos=2, utts=2, seconds=1.0)
    return root


E2E = dict(variant="b0", random_init=True, crop_seconds=0.5, batch_size=4, lr=1e-2, val_speakers=0,
           margin_warmup_epochs=0, scale=16, progress=False)


@pytest.mark.slow
def test_end_to_end_frozen_loss_falls(tiny_corpus, tmp_path):
    from mrlcache.fit import fit_end_to_end

    run = fit_end_to_end(tiny_corpus, (16, 32), tmp_path / "run", views=1, epochs=6, loss="softmax", **E2E)
    hist = read_history(run)
    first, last = (np.mean(list(hist[k]["loss"].values())) for k in (0, -1))
    assert last < 0.5 * first, [h["loss"] for h in hist]
    assert all(h["samples"] == 12 for h in hist)
    assert (run / "model.pt").exists()


@pytest.mark.slow
def test_end_to_end_unfreezing_trains_the_backbone(tiny_corpus, tmp_path):
    from mrlcache.fit import fit_end_to_end
    from mrlcache.models.model import load_model
    from mrlcache.backbone.loading import load_backbone

    run = fit_end_to_end(tiny_corpus, (16, 32), tmp_path / "run", views=2, epochs=2, unfreeze_after=1,
                         backbone_lr=1e-3, grad_accum=2, **E2E)
    start = load_backbone(str(run / "backbone.pt"))
    trained = load_model(run / "model.pt").backbone
    changed = [k for k, v in start.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, trained.state_dict()[k])]
    assert changed, "the backbone did not change after unfreezing"
    assert any(k.startswith("backbone.") for k in changed)


@pytest.mark.slow
def test_end_to_end_leaves_out_broken_files_and_lists_them(tmp_path, capsys):
    """One unreadable file must not stop a fit: it is left out and listed with its reason."""
    from conftest import broken_files, make_tree

    from mrlcache.fit import fit_end_to_end

    data = tmp_path / "data"
    good = make_tree(data, speakers=5, videos=2, utts=2, seconds=1.0)
    broken = broken_files(data)  # a speaker of broken files only (reasons: every AudioError kind)
    for speaker in sorted(data.glob("id1000*")):  # and one broken file in every good speaker
        path = speaker / "v00" / "zz_not_audio.wav"
        path.write_bytes(b"not audio\n" * 50)
        broken[path] = "unreadable"
    # Worker processes: the failure used to be raised inside a DataLoader worker.
    run = fit_end_to_end(data, (16, 32), tmp_path / "run", views=2, epochs=2, workers=1,
                         **dict(E2E, val_speakers=3))

    rows = [line.split("\t") for line in (run / "skipped.tsv").read_text().splitlines()]
    assert rows[0] == ["utt_id", "reason", "detail"]
    listed = {r[0]: r[1] for r in rows[1:]}
    assert len(listed) == len(rows) - 1 == len(broken) == 10  # each once, over two epochs
    assert listed == {p.relative_to(data).as_posix(): reason for p, reason in broken.items()}
    assert all(r[2] for r in rows[1:])  # a detail for each

    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped"] == 10
    assert summary["skipped_by_reason"] == {"empty": 1, "silent": 1, "too_short": 1, "truncated": 1,
                                            "unreadable": 6}
    # Every readable training utterance is trained on in every epoch; nothing else is.
    val = set(json.loads((run / "fingerprint.json").read_text())["val_speakers"])
    n_good_train = sum(p.relative_to(data).parts[0] not in val for p in good)
    assert all(h["samples"] == n_good_train for h in read_history(run))
    assert "val_eer" in read_history(run)[-1] and (run / "model.pt").exists()
    assert "skipped 10 of 30 utterances" in capsys.readouterr().err


def test_readable_batches_drop_failed_crops_and_keep_two_rows():
    from mrlcache.fit.end_to_end import _readable_batches

    def batches(rows, bad):
        for r in rows:
            yield (torch.tensor(r, dtype=torch.float32)[:, None].repeat(1, 3), torch.tensor(r),
                   ["empty" if k in bad else "" for k in r], ["d" if k in bad else "" for k in r])

    skipped = []
    out = list(_readable_batches(batches([[0, 1], [2, 3], [4, 5], [6, 7]], {1, 2, 3, 7}),
                                 lambda row, reason, detail: skipped.append((row, reason, detail))))
    # [0] is carried into [4, 5]; the lone 6 at the end joins the last batch.
    assert [b[1].tolist() for b in out] == [[0, 4, 5, 6]]
    assert out[0][0][:, 0].tolist() == [0, 4, 5, 6]  # waves follow their rows
    assert skipped == [(1, "empty", "d"), (2, "empty", "d"), (3, "empty", "d"), (7, "empty", "d")]
    out = list(_readable_batches(batches([[0, 1, 2], [3, 4]], set()), lambda *a: None))
    assert [b[1].tolist() for b in out] == [[0, 1, 2], [3, 4]]  # no failures: unchanged
    with pytest.raises(FitError, match="fewer than 2"):
        list(_readable_batches(batches([[0, 1], [2, 3]], {0, 1, 2}), lambda *a: None))


@pytest.mark.slow
def test_cli_fit_and_its_errors(caches, tmp_path):
    from click.testing import CliRunner

    from mrlcache.cli import main

    runner = CliRunner()
    args = ["fit", "--cache", str(caches / "train"), "--head-only", "--epochs", "2", "--batch-size", "32",
            "--quiet", "--val-cache", str(caches / "val"), "--val-trials", str(caches / "trials.txt")]
    result = runner.invoke(main, args + ["--dims", "4,8,16,32", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    # One resolved config per run directory: config.yaml (the CLI writes no command.yaml beside it).
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "command.yaml").exists()
    result = runner.invoke(main, args + ["--dims", "32,16", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "strictly increasing" in result.output
    result = runner.invoke(main, args + ["--dims", "4,x", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "'x' is not an integer >= 1; give comma-separated values" in result.output
    result = runner.invoke(main, ["fit", "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "no such directory" in result.output
    result = runner.invoke(main, args + ["--dims", "4,8,16,32", "--out", str(tmp_path / "cs"), "--class-sample", "0.5"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "cs" / "config.yaml").read_text())["loss"]["class_sample"] == 0.5
    result = runner.invoke(main, args + ["--dims", "4,8", "--out", str(tmp_path / "bad"), "--class-sample", "1.5"])
    assert result.exit_code != 0 and "1.5 is not a finite number > 0 and <= 1" in result.output
    result = runner.invoke(main, args + ["--dims", "4,8", "--out", str(tmp_path / "bad"), "--grad-accum", "2",
                                         "--views", "3"])
    assert result.exit_code != 0 and "--views, --grad-accum only apply with --end-to-end" in result.output


@pytest.mark.parametrize("name", ["fit-demo.yaml", "fit-vox2-b2.yaml"])
def test_shipped_fit_configs_load(name):
    from pathlib import Path

    from mrlcache.cli import main
    from mrlcache.config import read_yaml_options

    path = Path(__file__).parents[2] / "configs" / name
    assert path.read_text().startswith("# mrlcache fit --config configs/" + name)
    options = read_yaml_options(path, main.commands["fit"])
    assert options["dims"] == "64,128,192,256"


@pytest.mark.slow
def test_end_to_end_frozen_matches_cache_mode(tmp_path):
    """Issue item 6: on a frozen backbone, end to end reaches the cache mode's result.

    Same corpus, backbone, seed, crops and augmented views: the cache is extracted with the
    views end to end draws on the fly, so both fits see the same pooled vectors in the same
    order and their loss curves and heads agree up to float noise. A mismatch in the e2e
    data path (other crops, no augmentation, labels, a backbone in train mode) moves the
    first epoch's loss by far more than the tolerance.
    """
    from mrlcache.augment import AugmentConfig
    from mrlcache.corpus import scan_tree
    from mrlcache.extract import ExtractConfig, extract
    from mrlcache.fit import fit_end_to_end
    from mrlcache.backbone.loading import load_backbone
    from mrlcache.demo.synth import make_corpus

    make_corpus(tmp_path / "corpus", speakers=8, test_speakers=2, utterances=4, seed=3, seconds=(0.8, 1.2))
    data = tmp_path / "corpus" / "train"  # 6 speakers x 4 utterances
    seed, crop, views, augment = 7, 0.5, 2, AugmentConfig()
    model = load_backbone("b0", random_init=True, seed=seed)  # what fit_end_to_end builds from seed
    extract(scan_tree(data), model, tmp_path / "cache",
            ExtractConfig.of(views=views, crop_seconds=crop, seed=seed, dtype="float32", device="cpu",
                          precision="fp32", augment=augment, workers=0),
            save_backbone=True, weights_source="b0", progress=False)
    opts = dict(epochs=4, batch_size=4, lr=1e-2, warmup_epochs=0.5, margin_warmup_epochs=0, scale=16,
                val_speakers=2, seed=seed, progress=False)
    cached = fit(tmp_path / "cache", (16, 32), tmp_path / "cached", head_only=True, feature_dtype="float32", **opts)
    e2e = fit_end_to_end(data, (16, 32), tmp_path / "e2e", variant="b0", random_init=True, crop_seconds=crop,
                         views=views, augment=augment, **opts)

    hc, he = read_history(cached), read_history(e2e)
    assert [h["samples"] for h in hc] == [h["samples"] for h in he] == [16] * 4
    loss_c = np.array([list(h["loss"].values()) for h in hc])  # (epochs, dims)
    loss_e = np.array([list(h["loss"].values()) for h in he])
    assert loss_c[-1].mean() < 0.5 * loss_c[0].mean(), loss_c  # a real curve, not two flat lines
    np.testing.assert_allclose(loss_e, loss_c, rtol=1e-3)
    head_c = torch.load(cached / "last.pt", weights_only=True)["head"]
    head_e = torch.load(e2e / "last.pt", weights_only=True)["head"]
    for k in ("bn.weight", "bn.bias", "linear.weight", "linear.bias"):
        torch.testing.assert_close(head_e[k], head_c[k], rtol=1e-3, atol=1e-4)
