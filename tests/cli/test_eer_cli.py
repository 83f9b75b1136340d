"""``mrlcache eer`` (and its library, ``mrlcache.evaluate``) and ``mrlcache embed`` on a tiny
corpus, tiny backbone and random head."""

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tree, speech_like, write_wav
from conftest import TINY

from mrlcache import metrics, scoring
from mrlcache.audio import MIN_SAMPLES, SAMPLE_RATE, load_audio
from mrlcache.cli import main
from mrlcache.corpus import scan_tree
from mrlcache.extract import ExtractConfig, extract
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import load_model, save_model
from mrlcache.backbone.loading import save_checkpoint
from mrlcache.backbone.redimnet import ReDimNet

pytestmark = pytest.mark.slow  # every test here runs a backbone on audio or a full command
DIMS = [4, 8]


def _model_file(path, backbone_seed, head_seed=1):
    torch.manual_seed(backbone_seed)
    backbone = ReDimNet(TINY).eval()
    save_checkpoint(backbone, path.with_name(path.stem + "-backbone.pt"))
    torch.manual_seed(head_seed)
    head = MatryoshkaHead(backbone.pooled_dim, DIMS).eval()
    save_model(path, head, backbone=backbone)
    return backbone


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eer")
    data = root / "data"
    make_tree(data, speakers=3, videos=2, utts=2, seconds=1.0)
    utts = scan_tree(data)
    backbone = _model_file(root / "model.pt", backbone_seed=0)
    _model_file(root / "other.pt", backbone_seed=5)  # same shapes, other weights
    cfg = ExtractConfig.of(mode="eval", dtype="float32", shard_size=5, device="cpu", workers=0)
    extract(utts, backbone, root / "cache", cfg, progress=False)
    lines = []
    for a, b in itertools.combinations(utts, 2):
        lines.append(f"{int(a.speaker == b.speaker)} {a.utt_id} {b.utt_id}")
    (root / "trials.txt").write_text("\n".join(lines) + "\n")
    return root, utts


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def eer_json(root, *args, name="out.json"):
    out = root / name
    result = run("eer", "--model", root / "model.pt", "--trials", root / "trials.txt", "--json", out, *args)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def cosine_rows(emb, trials_file, dims, mean=None):
    """Plain-numpy cosine scores of every trial at every prefix, and the labels."""
    lines = [line.split() for line in trials_file.read_text().splitlines()]
    return lines, {
        d: np.array([_cos(emb[e][:d], emb[t][:d], mean) for _, e, t in lines]) for d in dims
    }, np.array([int(label) for label, _, _ in lines])


def _cos(a, b, mean):
    if mean is not None:
        a, b = a - mean[: a.size], b - mean[: b.size]
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def cached_vectors(root):
    from mrlcache import cache

    c = cache.open(root / "cache")
    return dict(zip(c.utterances, c.read("pooled", view=0).astype(np.float64)))


def test_cache_mode_table_json_and_direct_check(setup):
    root, utts = setup
    report, output = eer_json(root, "--cache", root / "cache", "--baseline", "raw", "--baseline", "published")
    assert report["trials"] == str(root / "trials.txt")
    assert (report["n_target"], report["n_nontarget"]) == (18, 48)  # 3 speakers x C(4, 2) targets of 66
    model = load_model(root / "model.pt")
    systems = [(r["system"], r["dim"]) for r in report["results"]]
    assert systems == [("mrl", 4), ("mrl", 8), ("raw", model.head.pooled_dim), ("published", 192)]
    for r in report["results"]:
        assert set(r) >= {"system", "dim", "eer", "threshold", "min_dcf_0.01", "min_dcf_0.05"}
        assert r["bytes_per_utterance"] == 4 * r["dim"]
    assert "EER (%)" in output and "minDCF .05" in output

    # The mrl rows, recomputed from the cached vectors with plain numpy.
    pooled = cached_vectors(root)
    emb = {u: model.project(v[None].astype(np.float32))[0].astype(np.float64) for u, v in pooled.items()}
    _, scores, labels = cosine_rows(emb, root / "trials.txt", DIMS)
    for r in report["results"][:2]:
        value, threshold = metrics.eer(scores[r["dim"]], labels)
        assert r["eer"] == pytest.approx(value, abs=1e-9)
        assert r["threshold"] == pytest.approx(threshold, abs=1e-5)
        assert r["min_dcf_0.05"] == pytest.approx(metrics.min_dcf(scores[r["dim"]], labels, 0.05), abs=1e-9)
    assert (root / "out.options.yaml").is_file()


def test_audio_mode_agrees_with_cache_mode(setup):
    root, _ = setup
    args = ["--baseline", "raw", "--baseline", "published"]
    from_cache, _ = eer_json(root, "--cache", root / "cache", *args, name="c.json")
    from_audio, _ = eer_json(root, "--data", root / "data", *args, name="a.json")
    assert len(from_cache["results"]) == len(from_audio["results"]) == 4
    for a, b in zip(from_cache["results"], from_audio["results"]):
        assert (a["system"], a["dim"]) == (b["system"], b["dim"])
        for key in ("eer", "min_dcf_0.01", "min_dcf_0.05"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a, b)
        assert a["threshold"] == pytest.approx(b["threshold"], abs=1e-4)


def test_pca_baseline_matches_numpy_pca(setup):
    root, _ = setup
    report, _ = eer_json(root, "--cache", root / "cache", "--baseline", "pca", "--pca-cache", root / "cache")
    rows = [r for r in report["results"] if r["system"] == "pca"]
    assert [r["dim"] for r in rows] == DIMS
    model = load_model(root / "model.pt")
    pooled = cached_vectors(root)
    ids = list(pooled)
    with torch.no_grad():
        pub = model.backbone.head(torch.tensor(np.stack([pooled[u] for u in ids]), dtype=torch.float32))
    pub = pub.numpy().astype(np.float64)
    centred = pub - pub.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # rows: principal directions
    proj = dict(zip(ids, centred @ vt.T))
    _, scores, labels = cosine_rows(proj, root / "trials.txt", DIMS)
    for r in rows:
        assert r["eer"] == pytest.approx(metrics.eer(scores[r["dim"]], labels)[0], abs=1e-9)


def test_lda_baseline_and_best_baseline_ratio(setup):
    from mrlcache.baselines import fit_lda

    root, _ = setup
    report, out = eer_json(root, "--cache", root / "cache", "--baseline", "lda", "--baseline", "pca",
                           "--pca-cache", root / "cache", name="lda.json")
    rows = [r for r in report["results"] if r["system"] == "lda"]
    assert [r["dim"] for r in rows] == DIMS
    # The streamed LDA over the cache is the LDA of the published embeddings in hand.
    model = load_model(root / "model.pt")
    pooled = cached_vectors(root)
    ids = list(pooled)
    with torch.no_grad():
        pub = model.backbone.head(torch.tensor(np.stack([pooled[u] for u in ids]), dtype=torch.float32))
    pub = pub.numpy().astype(np.float64)
    mean, directions = fit_lda(pub, [u.split("/")[0] for u in ids])
    _, scores, labels = cosine_rows(dict(zip(ids, (pub - mean) @ directions)), root / "trials.txt", DIMS)
    for r in rows:
        assert r["eer"] == pytest.approx(metrics.eer(scores[r["dim"]], labels)[0], abs=1e-6)
    # Per dim: the best of pca and lda, and mrl's EER over it.
    best = report["mrl_over_best_baseline_eer"]
    for d in DIMS:
        others = [r for r in report["results"] if r["system"] in ("pca", "lda") and r["dim"] == d]
        top = min(others, key=lambda r: r["eer"])
        mrl = next(r for r in report["results"] if r["system"] == "mrl" and r["dim"] == d)
        assert best[str(d)]["system"] == top["system"]
        if top["eer"] > 0:
            assert best[str(d)]["ratio"] == pytest.approx(mrl["eer"] / top["eer"])
    assert "MRL/best" in out


def test_center_and_asnorm(setup):
    root, _ = setup
    model = load_model(root / "model.pt")
    pooled = cached_vectors(root)
    ids = list(pooled)
    emb = model.project(np.stack([pooled[u] for u in ids]).astype(np.float32)).astype(np.float64)
    mean = emb.mean(axis=0)

    centred, _ = eer_json(root, "--cache", root / "cache", "--center", root / "cache", name="centre.json")
    _, scores, labels = cosine_rows(dict(zip(ids, emb)), root / "trials.txt", DIMS, mean=mean)
    for r in centred["results"]:
        assert r["eer"] == pytest.approx(metrics.eer(scores[r["dim"]], labels)[0], abs=1e-9)

    normed, _ = eer_json(root, "--cache", root / "cache", "--center", root / "cache",
                         "--asnorm-cohort", root / "cache", "--asnorm-topk", "2", name="asnorm.json")
    speakers = [u.split("/")[0] for u in ids]
    _, cohort = scoring.speaker_means(emb, speakers)
    assert cohort.shape[0] == 3
    lines = [line.split() for line in (root / "trials.txt").read_text().splitlines()]
    row = {u: i for i, u in enumerate(ids)}
    ie = np.array([row[e] for _, e, _ in lines])
    it = np.array([row[t] for _, _, t in lines])
    raw = np.stack([scores[d] for d in DIMS])
    expected = scoring.asnorm(raw, emb, ie, it, cohort, 2, DIMS, mean=mean)
    for r, exp in zip(normed["results"], expected):
        assert r["eer"] == pytest.approx(metrics.eer(exp, labels)[0], abs=1e-9)


def test_library_scores_trials_without_the_cli(setup, tmp_path):
    from mrlcache import evaluate as ev
    from mrlcache.cli import eer as cli_eer
    from mrlcache.trials import read_trials

    root, utts = setup
    baseline = next(p for p in cli_eer.eer.params if p.name == "baselines")
    assert tuple(baseline.type.choices) == ev.SYSTEMS[1:]  # the CLI's choices are the library's systems
    model = load_model(root / "model.pt")
    trials = read_trials(root / "trials.txt")
    v = ev.pooled_from_cache(ev.open_cache_for(root / "cache", model), trials)
    assert (v.skipped_trials, v.missing, len(v.utterances)) == (0, [], 12)
    results = ev.evaluate(v.trials, v.utterances, v.pooled, ev.transforms(model, ["mrl", "raw"]), [8])
    assert [(r["system"], r["dim"]) for r in results] == [("mrl", 8), ("raw", model.head.pooled_dim)]
    # The raw row, from the cached vectors with plain numpy.
    _, scores, labels = cosine_rows(cached_vectors(root), root / "trials.txt", [model.head.pooled_dim])
    value, threshold = metrics.eer(scores[model.head.pooled_dim], labels)
    assert results[1]["eer"] == pytest.approx(value, abs=1e-9)
    assert results[1]["threshold"] == pytest.approx(threshold, abs=1e-5)

    # A trial naming an utterance the cache lacks: an error, or (skip_missing) that trial dropped.
    ghost = "id10001/v09/00001.wav"
    more = tmp_path / "t.txt"
    more.write_text((root / "trials.txt").read_text() + f"0 {utts[0].utt_id} {ghost}\n")
    cache = ev.open_cache_for(root / "cache", model)
    with pytest.raises(ev.MissingUtterancesError, match="1 of 13 trial utterances.*skip_missing=True") as err:
        ev.pooled_from_cache(cache, read_trials(more))
    assert err.value.missing == [ghost]
    v = ev.pooled_from_cache(cache, read_trials(more), skip_missing=True)
    assert (v.skipped_trials, v.missing, len(v.trials)) == (1, [ghost], 66)
    with pytest.raises(ev.EvaluateError, match="was extracted with backbone weights"):
        ev.open_cache_for(root / "cache", load_model(root / "other.pt"))


def test_missing_utterances(setup, tmp_path):
    root, utts = setup
    trials = tmp_path / "t.txt"
    ghosts = ["id10001/v09/00001.wav", "id10002/v09/00002.wav"]
    extra = [f"0 {utts[0].utt_id} {ghosts[0]}", f"1 {ghosts[1]} {utts[1].utt_id}"]
    trials.write_text((root / "trials.txt").read_text() + "\n".join(extra) + "\n")
    for mode in (["--cache", root / "cache"], ["--data", root / "data"]):
        result = run("eer", "--model", root / "model.pt", "--trials", trials, *mode)
        assert result.exit_code != 0
        assert "2 of 14 trial utterances are missing" in result.output
        assert ghosts[0] in result.output and "--skip-missing" in result.output

        out = tmp_path / "skip.json"
        result = run("eer", "--model", root / "model.pt", "--trials", trials, *mode,
                     "--skip-missing", "--json", out)
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        assert report["skipped_trials"] == 2
        assert report["n_target"] + report["n_nontarget"] == 66
        assert "skipped 2 of 68 trials" in result.output


def test_refuses_cache_of_other_weights(setup):
    root, _ = setup
    result = run("eer", "--model", root / "other.pt", "--trials", root / "trials.txt",
                 "--cache", root / "cache")
    assert result.exit_code != 0
    want = load_model(root / "other.pt").weights_sha256
    have = load_model(root / "model.pt").weights_sha256
    assert want != have and want in result.output and have in result.output


def test_bad_trial_line_and_bad_options(setup, tmp_path):
    root, utts = setup
    bad = tmp_path / "bad.txt"
    bad.write_text(f"1 {utts[0].utt_id} {utts[1].utt_id}\n1 {utts[0].utt_id}\n")
    result = run("eer", "--model", root / "model.pt", "--trials", bad, "--cache", root / "cache")
    assert result.exit_code != 0 and f"{bad}:2:" in result.output
    base = ["eer", "--model", root / "model.pt", "--trials", root / "trials.txt"]
    result = run(*base)
    assert result.exit_code != 0 and "exactly one of --cache" in result.output
    result = run(*base, "--cache", root / "cache", "--dims", "4,16")
    assert result.exit_code != 0 and "trained for dims [4, 8]" in result.output
    result = run(*base, "--cache", root / "cache", "--baseline", "pca")
    assert result.exit_code != 0 and "--pca-cache" in result.output


def test_duplicate_trials_are_reported_and_scored_as_listed(setup, tmp_path):
    root, utts = setup
    lines = (root / "trials.txt").read_text().splitlines()
    doubled = tmp_path / "doubled.txt"
    doubled.write_text("\n".join(lines + lines[:2]) + "\n")
    once, _ = eer_json(root, "--cache", root / "cache", name="once.json")
    report, output = eer_json(root, "--cache", root / "cache", "--trials", doubled, name="twice.json")
    assert f"{doubled}: 2 duplicate trial(s) (line {len(lines) + 1} repeats line 1" in " ".join(output.split())
    assert report["n_target"] + report["n_nontarget"] == once["n_target"] + once["n_nontarget"] + 2


def test_plot_needs_matplotlib(setup, tmp_path):
    root, _ = setup
    args = ["eer", "--model", root / "model.pt", "--trials", root / "trials.txt", "--cache", root / "cache",
            "--plot", tmp_path / "p.png"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        result = run(*args)
        assert result.exit_code != 0 and "pip install 'matplotlib>=3.9'" in result.output
    else:
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_embed_npy_and_dir(setup, tmp_path):
    root, utts = setup
    out = tmp_path / "emb.npy"
    result = run("embed", "--model", root / "model.pt", root / "data", "--out", out)
    assert result.exit_code == 0, result.output
    emb = np.load(out)
    ids = (tmp_path / "emb.ids.txt").read_text().split()
    assert emb.shape == (12, 8) and ids == [u.utt_id for u in utts]
    model = load_model(root / "model.pt")
    with torch.no_grad():
        direct = model(torch.from_numpy(load_audio(utts[3].path))[None], dim=8)[0].numpy()
    np.testing.assert_allclose(emb[3], direct, rtol=1e-5, atol=1e-6)

    folder = tmp_path / "embs"
    one = root / "data" / utts[3].utt_id
    result = run("embed", "--model", root / "model.pt", one, "--dim", "4", "--out", folder)
    assert result.exit_code == 0, result.output
    (written,) = list(folder.rglob("*.npy"))
    np.testing.assert_allclose(np.load(written), emb[3][:4], rtol=1e-5, atol=1e-6)  # a prefix of dim 8
    result = run("embed", "--model", root / "model.pt", one, "--dim", "5", "--out", folder)
    assert result.exit_code != 0 and "trained for dims [4, 8]" in result.output


def test_embed_kaldi_and_npz_hold_the_npy_embeddings(setup, tmp_path):
    import kaldiio

    root, utts = setup
    assert run("embed", "--model", root / "model.pt", root / "data", "--out", tmp_path / "e.npy").exit_code == 0
    want = dict(zip((tmp_path / "e.ids.txt").read_text().split(), np.load(tmp_path / "e.npy")))
    result = run("embed", "--model", root / "model.pt", root / "data", "--format", "kaldi", "--out", tmp_path / "k")
    assert result.exit_code == 0, result.output
    got = dict(kaldiio.load_scp(str(tmp_path / "k.scp")))  # what Kaldi/WeSpeaker scoring reads
    assert sorted(got) == sorted(want)
    for utt, vector in want.items():
        np.testing.assert_array_equal(np.asarray(got[utt]), vector)
    result = run("embed", "--model", root / "model.pt", root / "data", "--format", "npz", "--out", tmp_path / "z")
    assert result.exit_code == 0, result.output
    z = np.load(tmp_path / "z.npz")
    assert list(z["ids"]) == list(want)
    np.testing.assert_array_equal(z["vectors"], np.stack(list(want.values())))


def test_audio_mode_skips_short_and_silent_files_as_extract_does(setup, tmp_path):
    # Before: a file too short for the frames was a torch traceback, silence was scored.
    root, utts = setup
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    write_wav(data / "id10001" / "v00" / "short.wav", speech_like(1.0)[:MIN_SAMPLES - 1], SAMPLE_RATE)
    write_wav(data / "id10001" / "v00" / "silent.wav", np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    trials = tmp_path / "t.txt"
    extra = [f"0 {utts[0].utt_id} id10001/v00/short.wav", f"1 id10001/v00/silent.wav {utts[1].utt_id}"]
    trials.write_text((root / "trials.txt").read_text() + "\n".join(extra) + "\n")
    result = run("eer", "--model", root / "model.pt", "--trials", trials, "--data", data)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert "2 of 14 trial utterances are missing" in result.output and "--skip-missing" in result.output
    assert "too_short" in result.output and "silent" in result.output
    result = run("eer", "--model", root / "model.pt", "--trials", trials, "--data", data, "--skip-missing")
    assert result.exit_code == 0 and "skipped 2 of 68 trials" in result.output, result.output


def test_one_scorer_gives_eer_and_calibrate_the_same_scores(setup):
    """calibrate fits on Scorer.scores, eer reports Scorer.evaluate: with a cohort, the EER of
    each dim's scores must be the eer row's (before, calibrate rebuilt the set-up by copy)."""
    from mrlcache.scorer import ScoreConfig, Scorer
    from mrlcache.trials import read_trials

    root, _ = setup
    scorer = Scorer(root / "model.pt", ScoreConfig(asnorm_cohort=str(root / "cache"), asnorm_topk=2))
    vectors = scorer.trial_vectors(read_trials(root / "trials.txt"), cache=root / "cache")
    rows = [r for r in scorer.evaluate(vectors) if r["system"] == "mrl"]
    scores, quality = scorer.scores(vectors)
    assert [r["dim"] for r in rows] == DIMS and scores.shape == (len(DIMS), len(vectors.trials))
    for row, r in zip(scores, rows):
        assert metrics.eer(row, vectors.trials.labels)[0] == r["eer"]
    assert sorted(quality) == ["cohort_mu_enroll", "cohort_mu_test"]
    # The same scorer options through the command line give the same table.
    report, _ = eer_json(root, "--cache", root / "cache", "--asnorm-cohort", root / "cache", "--asnorm-topk", 2)
    assert [r["eer"] for r in report["results"]] == [r["eer"] for r in rows]


def test_dims_are_parsed_once_and_checked_against_the_model(setup):
    from mrlcache.dims import parse_dims, select_dims
    from mrlcache.ranges import RangeError

    assert parse_dims("8, 4") == (8, 4) and select_dims((8, 4, 8), DIMS) == [4, 8]
    assert select_dims(None, DIMS) == DIMS
    for bad in ("", " ", ",", "4,,x"):
        with pytest.raises(RangeError):
            parse_dims(bad)
    with pytest.raises(RangeError, match=r"--dims 16: the model was trained for dims \[4, 8\] only"):
        select_dims((16,), DIMS)
    root, _ = setup
    result = run("eer", "--model", root / "model.pt", "--trials", root / "trials.txt", "--cache", root / "cache",
                 "--dims", "16")
    assert result.exit_code == 1 and "Error: --dims 16: the model was trained for dims [4, 8] only" in result.output
