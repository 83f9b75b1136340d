"""EER, minDCF and the detection curve against a brute-force reference and hand cases."""

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
