"""``eer --calibration`` and ``eer --snorm-cohort`` on tiny synthetic caches (head-only model).

Calibration trials come from the training speakers' cache; the evaluation trials are of
other speakers. Cllr, EER and S-Norm are recomputed here from the cached vectors.
"""

import itertools
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from conftest import write_wav

from mrlcache import cache as cache_mod
from mrlcache import metrics
from mrlcache.calibration import Calibration
from mrlcache.cli import main
from mrlcache.corpus import Utterance
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import load_model, save_model

P, DIMS = 32, [8, 16]


def _write_cache(path, data, utt_ids, pooled):
    meta = {"pooled_dim": P, "views": 1, "dtype": "float32", "shard_size": 40, "mode": "eval",
            "weights_sha256": None, "max_seconds": None}
    utts = [Utterance(u, str(data / u), u.split("/")[0]) for u in utt_ids]
    with cache_mod.CacheWriter(path, meta, utts) as writer:
        for k in range(math.ceil(len(utts) / 40)):
            rows = writer.shard_rows(k)
            writer.write_shard(k, np.arange(rows.start, rows.stop), pooled[rows.start : rows.stop, None], {}, 1.0)
        writer.finish()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eercal")
    rng = np.random.default_rng(1)
    ids, pooled = {"train": [], "eval": []}, {"train": [], "eval": []}
    for s in range(48):
        split = "train" if s < 36 else "eval"
        centre = rng.normal(size=P)
        for v in range(2):
            for u in range(2):
                utt = f"id{s:05d}/vid{v}/{u:05d}.wav"
                seconds = 0.3 + 0.1 * ((s + v + u) % 4)
                write_wav(root / "data" / utt, np.zeros(int(16000 * seconds), dtype=np.float32), 16000)
                ids[split].append(utt)
                pooled[split].append(centre + 0.5 * rng.normal(size=P))
    for split in ids:
        pooled[split] = np.asarray(pooled[split], dtype=np.float32)
        _write_cache(root / split, root / "data", ids[split], pooled[split])
    torch.manual_seed(0)
    save_model(root / "run" / "model.pt", MatryoshkaHead(P, DIMS).eval())
    torch.manual_seed(1)
    save_model(root / "other" / "model.pt", MatryoshkaHead(P, DIMS).eval())
    lines = [f"{int(a[:7] == b[:7])} {a} {b}" for a, b in itertools.combinations(ids["eval"], 2)]
    (root / "trials.txt").write_text("\n".join(lines) + "\n")
    return root, ids, pooled


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def calibrate(root, name, *extra):
    out = root / "run" / f"{name}.json"
    result = run("calibrate", "--model", root / "run/model.pt", "--cache", root / "train",
                 "--make-trials", 240, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return out


def eer_json(root, name, *extra):
    out = root / f"{name}.json"
    result = run("eer", "--model", root / "run/model.pt", "--trials", root / "trials.txt", "--json", out, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def _cosines(root, ids, pooled, d):
    """(T,) cosines of the evaluation trials at dim d, and their labels, from the cached vectors."""
    emb = load_model(root / "run/model.pt").project(pooled["eval"]).astype(np.float64)[:, :d]
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    row = {u: i for i, u in enumerate(ids["eval"])}
    pairs = list(itertools.combinations(ids["eval"], 2))
    cos = np.array([x[row[a]] @ x[row[b]] for a, b in pairs])
    return cos, np.array([int(a[:7] == b[:7]) for a, b in pairs]), pairs


@pytest.mark.slow
def test_eer_calibration_lowers_cllr_and_keeps_eer(setup):
    root, ids, pooled = setup
    cal_file = calibrate(root, "cal")
    plain, _ = eer_json(root, "plain", "--cache", root / "eval")
    report, output = eer_json(root, "calibrated", "--cache", root / "eval", "--calibration", cal_file)
    assert report["calibration"]["p_targets"] == [0.01, 0.05]
    assert report["calibration"]["c_miss"] == 1.0 and report["calibration"]["c_fa"] == 1.0
    assert "actDCF" in output and "c_miss = c_fa = 1" in output
    cal = Calibration.from_json(cal_file)
    for before, after in zip(plain["results"], report["results"]):
        d = after["dim"]
        cos, labels, _ = _cosines(root, ids, pooled, d)
        llr = cal.params[d]["a"] * cos + cal.params[d]["b"]
        # EER and minDCF do not change: the calibration is an increasing map.
        assert {k: after[k] for k in before} == before
        assert after["eer"] == pytest.approx(metrics.eer(cos, labels)[0], abs=1e-9)
        assert after["cllr"] == pytest.approx(metrics.cllr(llr, labels), rel=1e-6)
        assert after["cllr"] < 0.5 * metrics.cllr(cos, labels)  # well below the cosine taken as an LLR
        assert after["min_cllr"] <= after["cllr"]
        for p in (0.01, 0.05):
            assert after[f"act_dcf_{p}"] == pytest.approx(metrics.act_dcf(llr, labels, p_target=p), rel=1e-6)


@pytest.mark.slow
def test_eer_calibration_with_durations(setup):
    root, ids, pooled = setup
    cal_file = calibrate(root, "dur", "--data", root / "data")
    cal = Calibration.from_json(cal_file)
    assert cal.quality == ["log_dur_enroll", "log_dur_test"]
    report, _ = eer_json(root, "dur", "--cache", root / "eval", "--data", root / "data", "--calibration", cal_file)
    for r in report["results"]:
        cos, labels, pairs = _cosines(root, ids, pooled, r["dim"])
        seconds = {u: sf.info(root / "data" / u).duration for u in ids["eval"]}
        p = cal.params[r["dim"]]
        llr = (p["a"] * cos + p["b"] + p["w"][0] * np.log([seconds[a] for a, _ in pairs])
               + p["w"][1] * np.log([seconds[b] for _, b in pairs]))
        assert r["cllr"] == pytest.approx(metrics.cllr(llr, labels), rel=1e-6)


@pytest.mark.slow
def test_eer_snorm(setup):
    root, ids, pooled = setup
    report, output = eer_json(root, "snorm", "--cache", root / "eval", "--snorm-cohort", root / "train",
                              "--dims", 8)
    assert "S-Norm" in output
    model = load_model(root / "run/model.pt")
    emb = model.project(pooled["eval"]).astype(np.float64)[:, :8]
    train = model.project(pooled["train"]).astype(np.float64)[:, :8]
    speakers = np.array([u[:7] for u in ids["train"]])
    cohort = np.stack([train[speakers == s].mean(0) for s in sorted(set(speakers))])  # (36, 8)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    e, c = unit(emb), unit(cohort)
    cs = e @ c.T  # (U, 36): every cohort score, no top-k
    mu, sd = cs.mean(1), cs.std(1)
    row = {u: i for i, u in enumerate(ids["eval"])}
    pairs = list(itertools.combinations(ids["eval"], 2))
    s = np.array([e[row[a]] @ e[row[b]] for a, b in pairs])
    ia, ib = np.array([row[a] for a, _ in pairs]), np.array([row[b] for _, b in pairs])
    normed = 0.5 * ((s - mu[ia]) / sd[ia] + (s - mu[ib]) / sd[ib])
    labels = np.array([int(a[:7] == b[:7]) for a, b in pairs])
    assert report["results"][0]["eer"] == pytest.approx(metrics.eer(normed, labels)[0], abs=1e-9)


@pytest.mark.slow
def test_eer_calibration_refusals(setup):
    root, _, _ = setup
    plain = calibrate(root, "cal8", "--dims", 8)
    dur = calibrate(root, "dur8", "--dims", 8, "--data", root / "data")
    asn = calibrate(root, "asn8", "--dims", 8, "--asnorm-cohort", root / "train", "--topk", 5)
    base = ["eer", "--trials", root / "trials.txt", "--cache", root / "eval"]
    cases = [
        (["--model", root / "other/model.pt", "--calibration", plain], "another model.pt"),
        (["--model", root / "run/model.pt", "--calibration", plain], "covers dims [8], not [16]"),
        (["--model", root / "run/model.pt", "--dims", 8, "--calibration", dur], "pass --data"),
        (["--model", root / "run/model.pt", "--dims", 8, "--calibration", asn], "--asnorm-cohort"),
        (["--model", root / "run/model.pt", "--dims", 8, "--calibration", asn, "--asnorm-cohort", root / "train",
          "--asnorm-topk", 6], "top-5"),
        (["--model", root / "run/model.pt", "--dims", 8, "--calibration", plain, "--data", root / "data"],
         "drop --data"),
        (["--model", root / "run/model.pt", "--snorm-cohort", root / "train", "--asnorm-cohort", root / "train"],
         "at most one of --asnorm-cohort and --snorm-cohort"),
    ]
    for extra, message in cases:
        result = run(*base, *extra)
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
        assert len([ln for ln in result.output.splitlines() if not ln.startswith("warning")]) == 1, result.output

