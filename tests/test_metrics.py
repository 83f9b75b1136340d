"""EER, minDCF and the detection curve against a brute-force reference and hand cases."""

import math
from fractions import Fraction

import numpy as np
import pytest

from mrlcache import metrics
from mrlcache.metrics import MetricsError


def brute_points(scores, labels):
    """(threshold, P_miss, P_fa) as exact Fractions for +inf and every distinct score.

    Counts each trial against each threshold with plain loops: no sorting tricks, no
    cumulative sums, nothing shared with the implementation under test.
    """
    scores = [float(s) for s in scores]
    labels = [int(v) for v in labels]
    n_tar = sum(labels)
    n_non = len(labels) - n_tar
    points = []
    for t in [float("inf")] + sorted(set(scores), reverse=True):
        miss = sum(1 for s, y in zip(scores, labels) if y == 1 and not s >= t)
        fa = sum(1 for s, y in zip(scores, labels) if y == 0 and s >= t)
        points.append((t, Fraction(miss, n_tar), Fraction(fa, n_non)))
    return points


def brute_eer(scores, labels):
    """Crossing of P_miss and P_fa on the segment between the bracketing points."""
    points = brute_points(scores, labels)
    for (ta, ma, fa_), (tb, mb, fb) in zip(points, points[1:]):
        da, db = ma - fa_, mb - fb
        if da >= 0 and db < 0:
            t = da / (da - db)
            value = ma + t * (mb - ma)
            assert value == fa_ + t * (fb - fa_)  # both curves meet there
            return float(value), (ta if abs(da) < abs(db) else tb)
    raise AssertionError("no crossing")


def brute_min_dcf(scores, labels, p_target, c_miss=1.0, c_fa=1.0):
    costs = [
        c_miss * p_target * float(m) + c_fa * (1 - p_target) * float(f)
        for _, m, f in brute_points(scores, labels)
    ]
    return min(costs) / min(c_miss * p_target, c_fa * (1 - p_target))


def score_sets():
    """(name, scores, labels): random, heavily tied, separable, inverted, unbalanced."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(3):
        labels = (rng.random(300) < 0.3).astype(int)
        out.append((f"random{i}", rng.normal(size=300) + 1.5 * labels, labels))
    for i in range(3):
        labels = (rng.random(400) < 0.5).astype(int)
        scores = rng.integers(0, 6, size=400) + labels * rng.integers(0, 3, size=400)
        out.append((f"tied{i}", scores.astype(float), labels))
    labels = np.array([1] * 20 + [0] * 50)
    out.append(("separable", np.concatenate([rng.uniform(1, 2, 20), rng.uniform(-1, 0.5, 50)]), labels))
    out.append(("inverted", np.concatenate([rng.uniform(-1, 0, 20), rng.uniform(0.5, 2, 50)]), labels))
    labels = np.array([1] * 3 + [0] * 500)
    out.append(("few_targets", rng.normal(size=503) + 2 * labels, labels))
    return out


@pytest.mark.parametrize("name,scores,labels", score_sets(), ids=[s[0] for s in score_sets()])
def test_eer_matches_brute_force(name, scores, labels):
    value, threshold = metrics.eer(scores, labels)
    ref_value, ref_threshold = brute_eer(scores, labels)
    assert value == pytest.approx(ref_value, abs=1e-12)
    assert threshold == ref_threshold


@pytest.mark.parametrize("p_target", [0.01, 0.05])
@pytest.mark.parametrize("name,scores,labels", score_sets(), ids=[s[0] for s in score_sets()])
def test_min_dcf_matches_brute_force(name, scores, labels, p_target):
    assert metrics.min_dcf(scores, labels, p_target) == pytest.approx(
        brute_min_dcf(scores, labels, p_target), abs=1e-12
    )


def test_min_dcf_with_unequal_costs():
    name, scores, labels = score_sets()[0]
    got = metrics.min_dcf(scores, labels, p_target=0.05, c_miss=10.0, c_fa=1.0)
    assert got == pytest.approx(brute_min_dcf(scores, labels, 0.05, 10.0, 1.0), abs=1e-12)


def test_hand_cases():
    # Descending: +inf (1, 0) -> 0.4 non (1, 1/2) -> 0.3 tar (1/2, 1/2): rates equal, EER 1/2.
    assert metrics.eer([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0]) == (0.5, 0.3)
    # One target at 3, non-targets 1, 2, 4: (1, 0) -> (1, 1/3) at 4 -> (0, 1/3) at 3.
    # P_fa is 1/3 along that segment, so the curves cross at 1/3; the point at 3 is nearer.
    value, threshold = metrics.eer([3, 1, 2, 4], [1, 0, 0, 0])
    assert value == pytest.approx(1 / 3) and threshold == 3
    # Separable: every target above every non-target -> EER 0 at the lowest target score.
    assert metrics.eer([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == (0.0, 0.8)
    # Inverted: every non-target above every target -> EER 1 at the lowest non-target.
    assert metrics.eer([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == (1.0, 0.8)
    # One score for all: only "reject all" and "accept all", crossing halfway.
    assert metrics.eer([0.5] * 6, [1, 0, 1, 0, 0, 0]) == (0.5, 0.5)
    # ... and minDCF no better than the trivial system.
    assert metrics.min_dcf([0.5] * 6, [1, 0, 1, 0, 0, 0]) == 1.0
    assert metrics.min_dcf([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0], p_target=0.05) == 0.0


def test_ties_do_not_depend_on_trial_order():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 1000)
    scores = rng.integers(0, 4, 1000).astype(float) + labels
    perm = rng.permutation(1000)
    assert metrics.eer(scores, labels) == metrics.eer(scores[perm], labels[perm])
    assert metrics.min_dcf(scores, labels) == metrics.min_dcf(scores[perm], labels[perm])


def test_detection_curve():
    thresholds, p_miss, p_fa = metrics.detection_curve([0.1, 0.2, 0.2, 0.4], [1, 0, 1, 0])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.4, 0.2, 0.1])
    np.testing.assert_array_equal(p_miss, [1, 1, 0.5, 0])
    np.testing.assert_array_equal(p_fa, [0, 0.5, 1, 1])


def test_accepts_bool_int_and_float_labels():
    scores = [0.1, 0.2, 0.3, 0.4]
    ref = metrics.eer(scores, [1, 0, 1, 0])
    assert metrics.eer(scores, np.array([True, False, True, False])) == ref
    assert metrics.eer(scores, np.array([1.0, 0.0, 1.0, 0.0])) == ref
    assert metrics.eer(np.float32(scores), np.int8([1, 0, 1, 0]))[0] == ref[0]


@pytest.mark.parametrize(
    "scores,labels,message",
    [
        ([], [], "empty"),
        ([0.1, 0.2], [1, 2], "0 or 1"),
        ([0.1, 0.2], [1, -1], "0 or 1"),
        ([0.1, 0.2], [0, 0], "no target"),
        ([0.1, 0.2], [1, 1], "no non-target"),
        ([0.1, np.nan, 0.3], [1, 0, 1], "NaN"),
        ([0.1, 0.2, 0.3], [1, 0], "3 scores but 2 labels"),
        ([[0.1, 0.2]], [[1, 0]], "1-D"),
    ],
)
def test_bad_inputs(scores, labels, message):
    for fn in (metrics.eer, metrics.min_dcf, metrics.detection_curve):
        with pytest.raises(MetricsError, match=message):
            fn(scores, labels)


def test_bad_costs():
    with pytest.raises(MetricsError, match="p_target"):
        metrics.min_dcf([0.1, 0.2], [1, 0], p_target=1.0)
    with pytest.raises(MetricsError, match="positive"):
        metrics.min_dcf([0.1, 0.2], [1, 0], c_fa=0)


# ---------------------------------------------------------------- Cllr, minCllr, actDCF


def ref_cllr(llr, labels):
    """Cllr by its formula, one trial at a time."""
    tar = [math.log2(1 + math.exp(-v)) for v, y in zip(llr, labels) if y == 1]
    non = [math.log2(1 + math.exp(v)) for v, y in zip(llr, labels) if y == 0]
    return 0.5 * (sum(tar) / len(tar) + sum(non) / len(non))


def ref_pav_posteriors(scores, labels):
    """Brute-force PAV: one block per distinct score, then merge any adjacent violating
    pair (left mean >= right mean) until there is none. Returns {score: posterior}."""
    blocks = []  # [scores in block, targets, trials], ascending
    for s in sorted(set(float(v) for v in scores)):
        ys = [int(y) for v, y in zip(scores, labels) if float(v) == s]
        blocks.append([[s], sum(ys), len(ys)])
    merged = True
    while merged:
        merged = False
        for i in range(len(blocks) - 1):
            a, b = blocks[i], blocks[i + 1]
            if Fraction(a[1], a[2]) >= Fraction(b[1], b[2]):
                blocks[i : i + 2] = [[a[0] + b[0], a[1] + b[1], a[2] + b[2]]]
                merged = True
                break
    return {s: Fraction(b[1], b[2]) for b in blocks for s in b[0]}


def ref_min_cllr(scores, labels):
    """Cllr of the brute-force PAV posteriors turned into LLRs, with the empirical prior."""
    post = ref_pav_posteriors(scores, labels)
    n_tar = sum(int(y) for y in labels)
    n_non = len(labels) - n_tar
    total_tar = total_non = 0.0
    for s, y in zip(scores, labels):
        p = post[float(s)]
        if y == 1:  # cost log2(1 + (1 - p) / p * n_tar / n_non); p > 0 in a block with a target
            total_tar += math.log2(1 + float((1 - p) / p * Fraction(n_tar, n_non)))
        elif p < 1:  # a block of targets only costs its (no) non-targets nothing
            total_non += math.log2(1 + float(p / (1 - p) / Fraction(n_tar, n_non)))
    return 0.5 * (total_tar / n_tar + total_non / n_non)


def ref_act_dcf(llr, labels, p_target, c_miss=1.0, c_fa=1.0):
    threshold = math.log(c_fa * (1 - p_target) / (c_miss * p_target))
    n_tar = sum(int(y) for y in labels)
    n_non = len(labels) - n_tar
    miss = sum(1 for v, y in zip(llr, labels) if y == 1 and v < threshold)
    fa = sum(1 for v, y in zip(llr, labels) if y == 0 and v >= threshold)
    cost = c_miss * p_target * miss / n_tar + c_fa * (1 - p_target) * fa / n_non
    return cost / min(c_miss * p_target, c_fa * (1 - p_target))


def calibrated_trials(n, mu=3.0, seed=0):
    """LLRs that are the true log-likelihood ratios of their own model.

    Target scores ~ N(mu, 2 mu), non-targets ~ N(-mu, 2 mu): then
    log N(s; mu, 2mu) - log N(s; -mu, 2mu) = s exactly, so the scores are perfectly calibrated.
    """
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.5).astype(int)
    llr = rng.normal(size=n) * math.sqrt(2 * mu) + mu * (2 * labels - 1)
    return llr, labels


@pytest.mark.parametrize("name,scores,labels", score_sets(), ids=[s[0] for s in score_sets()])
def test_cllr_and_min_cllr_match_reference(name, scores, labels):
    llr = np.asarray(scores) - np.mean(scores)  # treat any score set as LLRs too
    assert metrics.cllr(llr, labels) == pytest.approx(ref_cllr(llr, labels), rel=1e-12)
    assert metrics.min_cllr(scores, labels) == pytest.approx(ref_min_cllr(scores, labels), rel=1e-10, abs=1e-12)
    # PAV LLRs: their Cllr is minCllr, and they never decrease with the score.
    pav = metrics.pav_llr(scores, labels)
    order = np.argsort(scores, kind="stable")
    assert np.all(pav[order][1:] >= pav[order][:-1])
    assert metrics.cllr(pav, labels) == pytest.approx(metrics.min_cllr(scores, labels), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("p_target", [0.01, 0.05, 0.5])
@pytest.mark.parametrize("name,scores,labels", score_sets(), ids=[s[0] for s in score_sets()])
def test_act_dcf_matches_reference(name, scores, labels, p_target):
    llr = 3.0 * (np.asarray(scores) - np.median(scores))
    assert metrics.act_dcf(llr, labels, p_target) == pytest.approx(ref_act_dcf(llr, labels, p_target), abs=1e-12)
    # The actual cost is never below the minimum over all thresholds.
    assert metrics.act_dcf(llr, labels, p_target) >= metrics.min_dcf(llr, labels, p_target) - 1e-12
    got = metrics.act_dcf(llr, labels, p_target, c_miss=10.0, c_fa=1.0)
    assert got == pytest.approx(ref_act_dcf(llr, labels, p_target, 10.0, 1.0), abs=1e-12)


def test_cllr_hand_cases():
    # llr = 0 everywhere: log2(2) = 1 bit on each side.
    assert metrics.cllr([0.0, 0.0, 0.0], [1, 0, 0]) == pytest.approx(1.0)
    # llr = +-log(3) on the right sides: log2(1 + 1/3) = log2(4/3) for each trial.
    assert metrics.cllr([math.log(3), -math.log(3)], [1, 0]) == pytest.approx(math.log2(4 / 3))
    # Confidently wrong: infinite cost; confidently right: zero.
    assert metrics.cllr([-np.inf, -1.0], [1, 0]) == np.inf
    assert metrics.cllr([np.inf, -np.inf], [1, 0]) == 0.0
    # Separable scores: the PAV posteriors are 0 and 1, minCllr 0.
    assert metrics.min_cllr([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 0.0
    # One score for all: a single block at the prior; no information, minCllr 1.
    assert metrics.min_cllr([0.5] * 6, [1, 0, 1, 0, 0, 0]) == pytest.approx(1.0)
    # Inverted scores: the best monotone map is a constant, minCllr 1.
    assert metrics.min_cllr([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == pytest.approx(1.0)
    # Bayes threshold at p_target 0.01: log(99); an LLR just above accepts.
    assert metrics.bayes_threshold(0.01) == pytest.approx(math.log(99))
    assert metrics.act_dcf([math.log(99), -5.0], [1, 0], p_target=0.01) == 0.0


def test_perfectly_calibrated_scores():
    llr, labels = calibrated_trials(40_000)
    c, m = metrics.cllr(llr, labels), metrics.min_cllr(llr, labels)
    assert m <= c
    assert c - m < 0.01  # calibration loss only from the finite sample
    # The Cllr expected from the model: E_tar log2(1 + exp(-s)) over s ~ N(3, 6), by quadrature.
    grid = np.linspace(3 - 40, 3 + 40, 200_001)
    density = np.exp(-((grid - 3) ** 2) / 12) / math.sqrt(12 * math.pi)
    expected = np.trapezoid(density * np.logaddexp(0, -grid), grid) / math.log(2)
    assert c == pytest.approx(expected, abs=0.01)
    for p in (0.5, 0.05, 0.01):
        assert metrics.act_dcf(llr, labels, p) == pytest.approx(metrics.min_dcf(llr, labels, p), abs=0.03)


def test_badly_calibrated_scores():
    llr, labels = calibrated_trials(20_000, seed=1)
    m = metrics.min_cllr(llr, labels)
    # Monotone maps leave minCllr unchanged (it only sees the order) ...
    for f in (lambda x: 5 * x + 20, lambda x: 0.1 * x - 3, np.tanh, lambda x: x**3):
        assert metrics.min_cllr(f(llr), labels) == pytest.approx(m, abs=1e-12)
    # ... while Cllr and actDCF of shifted or over-confident LLRs are far worse.
    assert metrics.cllr(llr + 5, labels) > 2 * m
    assert metrics.cllr(4 * llr, labels) > 2 * m
    assert metrics.cllr(0.05 * llr, labels) > 2 * m
    assert metrics.act_dcf(llr - 6, labels, 0.05) > metrics.min_dcf(llr, labels, 0.05) + 0.3


def test_min_cllr_is_at_most_any_affine_calibration():
    name, scores, labels = score_sets()[0]
    m = metrics.min_cllr(scores, labels)
    for a in (0.5, 1.0, 2.0, 4.0):
        for b in (-2.0, 0.0, 1.0):
            assert m <= metrics.cllr(a * np.asarray(scores) + b, labels) + 1e-12


def test_new_metrics_refuse_bad_inputs():
    for fn in (metrics.cllr, metrics.min_cllr, metrics.act_dcf, metrics.pav_llr):
        with pytest.raises(MetricsError, match="no target"):
            fn([0.1, 0.2], [0, 0])
        with pytest.raises(MetricsError, match="NaN"):
            fn([0.1, np.nan], [1, 0])
    with pytest.raises(MetricsError, match="p_target"):
        metrics.act_dcf([0.1, 0.2], [1, 0], p_target=0.0)
