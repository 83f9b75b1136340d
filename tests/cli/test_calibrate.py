"""``mrlcache calibrate`` end to end on a tiny synthetic cache (a random head, made trials)."""


import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_wav

from mrlcache import cache as cache_mod
from mrlcache import metrics
from mrlcache.calibration import Calibration
from mrlcache.cli.calibrate import calibrate
from mrlcache.corpus import Utterance
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import load_model, save_model
from mrlcache.trials import read_trials

P, DIMS = 32, [8, 16]


def write_cache(path, utts, pooled, mode="eval"):
    meta = {"pooled_dim": P, "views": 1, "dtype": "float32", "shard_size": 40, "mode": mode,
            "weights_sha256": None, "max_seconds": None}
    with cache_mod.CacheWriter(path, meta, utts) as writer:
        for k in range(2):
            rows = writer.shard_rows(k)
            writer.write_shard(k, np.arange(rows.start, rows.stop), pooled[rows.start : rows.stop, None], {}, 1.0)
        writer.finish()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    rng = np.random.default_rng(0)
    utts, pooled = [], []
    centres = rng.normal(size=(8, P))
    for s in range(8):
        for v in range(2):
            for u in range(5):
                utt_id = f"id{s:05d}/vid{v}/{u:05d}.wav"
                seconds = 0.2 + 0.1 * ((s + v + u) % 5)
                write_wav(root / "data" / utt_id, np.zeros(int(16000 * seconds), dtype=np.float32), 16000)
                utts.append(Utterance(utt_id, str(root / "data" / utt_id), f"id{s:05d}"))
                pooled.append(centres[s] + 0.6 * rng.normal(size=P))
    pooled = np.asarray(pooled, dtype=np.float32)  # (80, P)
    write_cache(root / "cache", utts, pooled)
    write_cache(root / "train-cache", utts, pooled, mode="train")
    torch.manual_seed(0)
    (root / "run").mkdir()
    save_model(root / "run" / "model.pt", MatryoshkaHead(P, DIMS).eval())
    return root, pooled


def run(*args):
    return CliRunner().invoke(calibrate, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_calibrate_with_made_trials(setup):
    root, pooled = setup
    out = root / "run" / "calibration.json"
    result = run("--model", root / "run/model.pt", "--cache", root / "cache", "--make-trials", 400,
                 "--prior", 0.05, "--out", out, "--attach")
    assert result.exit_code == 0, result.output
    cal = Calibration.from_json(out)
    assert cal.dims == DIMS and cal.prior == 0.05 and cal.quality == []
    assert cal.info["trials"]["made"] == 400 and cal.info["n_target"] == 200
    assert (root / "run" / "model.calibration.json").read_text() == out.read_text()
    assert (root / "run" / "calibration.options.yaml").is_file()
    # The written trial list is the one fitted on: balanced, targets across videos.
    trials = read_trials(root / "run" / "calibration.trials.txt")
    assert len(trials) == 400 and trials.n_target == 200
    for y, e, t in zip(trials.labels, trials.enroll, trials.test):
        assert y == (e.split("/")[0] == t.split("/")[0])
        if y:
            assert e.split("/")[1] != t.split("/")[1]
    # Recompute the cosines independently and apply the calibration: the Cllr it reports.
    model = load_model(root / "run/model.pt")
    ids = [u.split("\t")[1] for u in (root / "cache/manifest.tsv").read_text().splitlines()[1:]]
    emb = model.project(pooled).astype(np.float64)  # (80, 16)
    row = {u: i for i, u in enumerate(ids)}
    for d in DIMS:
        x = emb[:, :d] / np.linalg.norm(emb[:, :d], axis=1, keepdims=True)
        cos = np.array([x[row[e]] @ x[row[t]] for e, t in zip(trials.enroll, trials.test)])
        llr = cal.apply(cos, d)
        fit = cal.info["fit"][str(d)]
        assert metrics.cllr(llr, trials.labels) == pytest.approx(fit["cllr"], rel=1e-5)
        assert metrics.cllr(cos, trials.labels) == pytest.approx(fit["cllr_raw"], rel=1e-5)
        assert fit["cllr"] < 0.7 * fit["cllr_raw"]
        assert metrics.eer(llr, trials.labels)[0] == pytest.approx(metrics.eer(cos, trials.labels)[0], abs=1e-9)
    assert "Cllr" in result.output


@pytest.mark.slow
def test_calibrate_with_trials_file_durations_and_asnorm(setup):
    root, _ = setup
    out = root / "run" / "qmf.json"
    trials_file = root / "cal-trials.txt"
    ids = [f"id{s:05d}/vid{v}/{u:05d}.wav" for s in range(8) for v in range(2) for u in range(5)]
    lines = [f"{int(a[:7] == b[:7])} {a} {b}" for i, a in enumerate(ids) for b in ids[i + 1 :: 7]]
    trials_file.write_text("\n".join(lines) + "\n")
    result = run("--model", root / "run/model.pt", "--cache", root / "cache", "--trials", trials_file,
                 "--data", root / "data", "--asnorm-cohort", root / "cache", "--topk", 4, "--out", out)
    assert result.exit_code == 0, result.output
    cal = Calibration.from_json(out)
    assert cal.quality == ["cohort_mu_enroll", "cohort_mu_test", "log_dur_enroll", "log_dur_test"]
    assert cal.info["asnorm"]["topk"] == 4 and len(cal.info["trials"]["sha256"]) == 64
    assert all(len(cal.params[d]["w"]) == 4 for d in DIMS)


@pytest.mark.slow
def test_calibrate_refusals(setup, tmp_path):
    root, _ = setup
    base = ["--model", root / "run/model.pt", "--out", tmp_path / "c.json"]
    veri = tmp_path / "veri_test2.txt"
    veri.write_text("1 id00000/vid0/00000.wav id00000/vid1/00000.wav\n")
    cases = [
        (["--cache", root / "cache"], "exactly one of --trials"),
        (["--cache", root / "cache", "--trials", veri], "evaluation list"),
        (["--cache", root / "train-cache", "--make-trials", 10], "train-mode cache"),
        (["--cache", root / "cache", "--make-trials", 100000], "distinct target pairs"),
        (["--cache", root / "cache", "--make-trials", 10, "--prior", 1.5], "'--prior': 1.5 is not a finite number > 0 and < 1"),
        (["--cache", root / "cache", "--make-trials", 10, "--dims", "12"], "trained for dims"),
    ]
    for extra, message in cases:
        result = run(*base, *extra)
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
    assert not (tmp_path / "c.json").exists()
