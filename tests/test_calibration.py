"""Calibration to LLRs: held-out Cllr, unchanged EER, a plain-formula reference, JSON, refusals, trials."""

import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize

from mrlcache import metrics
from mrlcache.calibration import Calibration, CalibrationError, fit_calibration, fit_linear, make_calibration_trials


def cosine_trials(n, seed, duration_effect=0.0):
    """Synthetic cosine scores: targets ~ N(0.55, 0.12), non-targets ~ N(0.05, 0.1).

    With ``duration_effect``, targets of short utterances (log duration low) score lower,
    as they do with real embeddings; returns scores, labels, log durations (T,) each.
    """
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.5).astype(np.int8)
    log_dur = np.log(rng.uniform(1.0, 12.0, n))
    tar = 0.55 + duration_effect * (log_dur - np.log(12.0)) + 0.12 * rng.normal(size=n)
    non = 0.05 + 0.1 * rng.normal(size=n)
    return np.where(labels == 1, tar, non), labels, log_dur


def ref_weighted_cllr(llr, labels, prior):
    """The prior-weighted cost (nats) by its formula, one trial at a time."""
    o = math.log(prior / (1 - prior))
    tar = [math.log1p(math.exp(-(v + o))) for v, y in zip(llr, labels) if y == 1]
    non = [math.log1p(math.exp(v + o)) for v, y in zip(llr, labels) if y == 0]
    return prior * sum(tar) / len(tar) + (1 - prior) * sum(non) / len(non)


@pytest.mark.parametrize("prior", [0.5, 0.01])
def test_fit_linear_minimises_the_weighted_cost(prior):
    s, y, _ = cosine_trials(600, seed=0)
    a, b, w = fit_linear(s, y, prior=prior)
    assert w.shape == (0,)
    ref = minimize(lambda t: ref_weighted_cllr(t[0] * s + t[1], y, prior), [1.0, 0.0], method="Nelder-Mead",
                   options={"xatol": 1e-7, "fatol": 1e-12, "maxiter": 4000})
    assert a == pytest.approx(ref.x[0], rel=1e-3)
    assert b == pytest.approx(ref.x[1], rel=1e-3, abs=1e-3)
    assert ref_weighted_cllr(a * s + b, y, prior) <= ref.fun + 1e-9


def test_calibration_lowers_held_out_cllr_and_keeps_eer():
    s_fit, y_fit, _ = cosine_trials(4000, seed=1)
    s_new, y_new, _ = cosine_trials(4000, seed=2)
    cal = fit_calibration(s_fit[None], y_fit, [64], prior=0.05)
    llr = cal.apply(s_new, 64)
    raw = metrics.cllr(s_new, y_new)  # the cosine taken as an LLR, as an uncalibrated system would be
    calibrated = metrics.cllr(llr, y_new)
    assert raw > 0.8 and calibrated < 0.3 * raw
    assert calibrated < metrics.min_cllr(s_new, y_new) + 0.03
    # An increasing affine map: the same ranking, so the same EER and minDCF.
    assert metrics.eer(llr, y_new)[0] == pytest.approx(metrics.eer(s_new, y_new)[0], abs=1e-12)
    assert metrics.min_dcf(llr, y_new, 0.01) == pytest.approx(metrics.min_dcf(s_new, y_new, 0.01), abs=1e-12)
    # Decisions at the Bayes threshold are close to the best threshold at the fitted prior.
    assert metrics.act_dcf(llr, y_new, 0.05) < metrics.min_dcf(s_new, y_new, 0.05) + 0.03
    assert metrics.act_dcf(s_new, y_new, 0.05) == 1.0  # raw cosines never reach the threshold log(19)
    fit = cal.info["fit"]["64"]
    assert fit["cllr"] < fit["cllr_raw"] and cal.info["n_target"] + cal.info["n_nontarget"] == 4000


def test_duration_quality_measures_help_when_duration_matters():
    s_fit, y_fit, d_fit = cosine_trials(6000, seed=3, duration_effect=0.15)
    s_new, y_new, d_new = cosine_trials(6000, seed=4, duration_effect=0.15)
    plain = fit_calibration(s_fit[None], y_fit, [32], prior=0.05)
    qmf = fit_calibration(s_fit[None], y_fit, [32], quality={"log_dur_test": d_fit}, prior=0.05)
    assert qmf.quality == ["log_dur_test"] and qmf.params[32]["w"][0] < 0  # short -> lower threshold
    c_plain = metrics.cllr(plain.apply(s_new, 32), y_new)
    c_qmf = metrics.cllr(qmf.apply(s_new, 32, {"log_dur_test": d_new}), y_new)
    assert c_qmf < c_plain - 0.02


def test_threshold_for_prior_and_far():
    s, y, _ = cosine_trials(8000, seed=5)
    cal = fit_calibration(np.stack([s, 2 * s]), y, [64, 128], prior=0.01)
    assert cal.threshold(p_target=0.01) == pytest.approx(math.log(99))
    assert cal.threshold(p_target=0.05, c_miss=10) == pytest.approx(math.log(0.95 / 0.5))
    llr_non = cal.apply(s, 64)[y == 0]
    for far in (0.1, 0.01, 0.002):
        t = cal.threshold(64, far=far)
        assert np.mean(llr_non >= t) == pytest.approx(far, rel=0.15, abs=2 / llr_non.size)
    with pytest.raises(CalibrationError, match="false-accept rates in"):
        cal.threshold(64, far=1e-6)
    with pytest.raises(CalibrationError, match="exactly one"):
        cal.threshold(64)
    with pytest.raises(CalibrationError, match="covers dims"):
        cal.apply(s, 256)


def test_json_round_trip(tmp_path):
    s, y, d = cosine_trials(1000, seed=6)
    cal = fit_calibration(np.stack([s, s + 0.1 * d]), y, [16, 32], quality={"log_dur_test": d},
                          prior=0.01, info={"trials": "made: 1000", "model_sha256": "ab" * 32})
    path = cal.to_json(tmp_path / "calibration.json")
    back = Calibration.from_json(path)
    assert back.dims == [16, 32] and back.prior == 0.01 and back.quality == ["log_dur_test"]
    assert back.info["trials"] == "made: 1000"
    for dim in (16, 32):
        np.testing.assert_array_equal(back.apply(s, dim, {"log_dur_test": d}), cal.apply(s, dim, {"log_dur_test": d}))
        assert back.threshold(dim, far=0.01) == cal.threshold(dim, far=0.01)


def test_bad_calibration_files(tmp_path):
    s, y, _ = cosine_trials(500, seed=7)
    info = {"model_sha256": "cd" * 32}
    good = json.loads(fit_calibration(s[None], y, [8], info=info).to_json(tmp_path / "good.json").read_text())
    with pytest.raises(CalibrationError, match="no such calibration file"):
        Calibration.from_json(tmp_path / "missing.json")
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(CalibrationError, match="not a calibration file"):
        Calibration.from_json(tmp_path / "text.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CalibrationError, match="not an mrlcache calibration"):
        Calibration.from_json(tmp_path / "other.json")
    cases = {
        "version": ({**good, "version": 99}, "version 99"),
        "negative": ({**good, "dims": {"8": {**good["dims"]["8"], "a": -1.0}}}, "must be > 0"),
        "weights": ({**good, "quality": ["log_dur_test"]}, "0 quality weights for 1"),
        "missing": ({k: v for k, v in good.items() if k != "prior"}, "missing key 'prior'"),
        "nan": ({**good, "dims": {"8": {**good["dims"]["8"], "b": float("nan")}}}, "non-finite"),
        # Strict (issue 19): without its info block or model SHA-256 a file could be applied to any model.
        "no-info": ({k: v for k, v in good.items() if k != "info"}, "missing key 'info'"),
        "no-sha": ({**good, "info": {}}, "missing key 'model_sha256'"),
        "bad-sha": ({**good, "info": {"model_sha256": "x"}}, "'x' is not a SHA-256"),
    }
    for name, (obj, message) in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
        with pytest.raises(CalibrationError, match=message):
            Calibration.from_json(tmp_path / f"{name}.json")


def test_fit_refusals():
    s, y, d = cosine_trials(500, seed=8)
    with pytest.raises(CalibrationError, match="<= 0"):
        fit_calibration(-s[None], y, [8])  # inverted scores
    with pytest.raises(CalibrationError, match="prior"):
        fit_calibration(s[None], y, [8], prior=1.0)
    with pytest.raises(CalibrationError, match="do not match"):
        fit_calibration(s[None], y, [8, 16])
    with pytest.raises(CalibrationError, match="target and non-target"):
        fit_linear(s, np.ones_like(y))
    cal = fit_calibration(s[None], y, [8], quality={"log_dur_test": d})
    with pytest.raises(CalibrationError, match="missing"):
        cal.apply(s, 8)


def vox_like(n_spk=6, videos=3, per_video=4):
    ids, spk = [], []
    for i in range(n_spk):
        for v in range(videos if i else 1):  # speaker 0 has a single video
            for u in range(per_video):
                ids.append(f"id{i:05d}/vid{v}/{u:05d}.wav")
                spk.append(f"id{i:05d}")
    return ids, spk


def test_make_calibration_trials():
    ids, spk = vox_like()
    speaker_of = dict(zip(ids, spk))
    trials = make_calibration_trials(ids, spk, 200, seed=0)
    assert len(trials) == 200 and trials.n_target == 100 and trials.n_nontarget == 100
    pairs = {tuple(sorted(p)) for p in zip(trials.enroll, trials.test)}
    assert len(pairs) == 200  # no pair twice
    for label, e, t in zip(trials.labels, trials.enroll, trials.test):
        assert e != t and label == (speaker_of[e] == speaker_of[t])
        if label and speaker_of[e] != "id00000":  # several videos: targets cross them
            assert e.split("/")[1] != t.split("/")[1]
    assert {speaker_of[e] for e, y in zip(trials.enroll, trials.labels) if y} == set(spk)  # all speakers used
    again = make_calibration_trials(ids, spk, 200, seed=0)
    assert again.enroll == trials.enroll and again.test == trials.test
    assert make_calibration_trials(ids, spk, 200, seed=1).enroll != trials.enroll


def test_make_calibration_trials_refusals():
    ids, spk = vox_like(n_spk=2, videos=2, per_video=2)
    # Speaker 0: one video, 2 utterances (1 pair); speaker 1: 2 videos x 2 (4 cross pairs).
    assert make_calibration_trials(ids, spk, 10, seed=0).n_target == 5
    with pytest.raises(CalibrationError, match="allow 5"):
        make_calibration_trials(ids, spk, 12)
    with pytest.raises(CalibrationError, match="at least 2 speakers"):
        make_calibration_trials(ids[:2], spk[:2], 2)
    with pytest.raises(CalibrationError, match="speaker label"):
        make_calibration_trials(ids, [""] * len(ids), 4)
