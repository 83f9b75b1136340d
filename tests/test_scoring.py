"""Prefix cosine scoring against a per-dim loop, speaker means, and AS-Norm by hand."""

import math

import numpy as np
import pytest

from mrlcache import scoring
from mrlcache.scoring import ScoringError


def loop_scores(emb, enroll, test, dims, mean=None):
    """One prefix at a time, one trial at a time: normalise in float64, then dot."""
    x = np.asarray(emb, dtype=np.float64)
    if mean is not None:
        x = x - mean
    out = np.empty((len(dims), len(enroll)))
    for i, d in enumerate(dims):
        for j, (e, t) in enumerate(zip(enroll, test)):
            a = x[e, :d] / np.linalg.norm(x[e, :d])
            b = x[t, :d] / np.linalg.norm(x[t, :d])
            out[i, j] = a @ b
    return out


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 24)).astype(np.float32) + 0.3
    enroll = rng.integers(0, 40, 500)
    test = rng.integers(0, 40, 500)
    return emb, enroll, test


@pytest.mark.parametrize("dims", [[4, 8, 16, 24], [16, 3, 24], [24], [1, 2]])
@pytest.mark.parametrize("centre", [False, True])
def test_score_trials_equals_per_dim_loop(data, dims, centre):
    emb, enroll, test = data
    mean = emb[:10].mean(axis=0) if centre else None
    # A small chunk so several blocks, including a ragged last one, are exercised.
    got = scoring.score_trials(emb, enroll, test, dims, mean=mean, chunk=64)
    assert got.shape == (len(dims), 500)
    np.testing.assert_allclose(got, loop_scores(emb, enroll, test, dims, mean), atol=1e-6)


def test_score_trials_self_similarity_is_one(data):
    emb, _, _ = data
    idx = np.arange(40)
    np.testing.assert_allclose(scoring.score_trials(emb, idx, idx, [5, 24]), 1.0, atol=1e-6)


def test_normalize_prefixes(data):
    emb, _, _ = data
    mean = emb.mean(axis=0)
    out = scoring.normalize_prefixes(emb, [8, 24], mean=mean)
    assert sorted(out) == [8, 24]
    for d, x in out.items():
        assert x.shape == (40, d) and x.dtype == np.float32
        ref = (emb[:, :d] - mean[:d]) / np.linalg.norm(emb[:, :d] - mean[:d], axis=1, keepdims=True)
        np.testing.assert_allclose(x, ref, atol=1e-6)


def test_bad_scoring_inputs(data):
    emb, enroll, test = data
    with pytest.raises(ScoringError, match=r"in \[1, 24\]"):
        scoring.score_trials(emb, enroll, test, [8, 32])
    with pytest.raises(ScoringError, match="distinct"):
        scoring.score_trials(emb, enroll, test, [8, 8])
    with pytest.raises(ScoringError, match="outside"):
        scoring.score_trials(emb, enroll, test + 40, [8])
    with pytest.raises(ScoringError, match="mean must have shape"):
        scoring.score_trials(emb, enroll, test, [8], mean=np.zeros(8))
    zero = emb.copy()
    zero[3, :4] = 0
    with pytest.raises(ScoringError, match="all-zero prefix"):
        scoring.score_trials(zero, enroll, test, [4, 8])


def test_speaker_means():
    emb = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 6.0]])
    names, means = scoring.speaker_means(emb, ["b", "b", "a", "b"])
    assert names == ["a", "b"]
    np.testing.assert_allclose(means, [[10.0, 0.0], [3.0, 4.0]])
    with pytest.raises(ScoringError, match="do not match"):
        scoring.speaker_means(emb, ["a"])


def test_asnorm_hand_case():
    # Two-dimensional prefix (dims [2, 3]); the third coordinate must not matter at d=2.
    # e = (1, 0), t1 = (0, 1), t2 = (-1, 0); cohort c1 = (1, 0), c2 = (0, 1), c3 = (1, 1),
    # top-k = 2 of the three cohort cosines on each side.
    emb = np.array([[1.0, 0.0, 7.0], [0.0, 1.0, -2.0], [-1.0, 0.0, 3.0]])
    cohort = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, -4.0]])
    enroll, test = np.array([0, 0]), np.array([1, 2])
    r = 1 / math.sqrt(2)
    # e vs cohort: (1, 0, r) -> top 2 = {1, r}: mu = (1 + r)/2, sd = (1 - r)/2.
    # t1 vs cohort: (0, 1, r) -> the same mu and sd. Raw score e.t1 = 0, so
    #   s' = (0 - mu)/sd = -(1 + r)/(1 - r) = -(3 + 2*sqrt(2)) = -5.8284...
    # t2 vs cohort: (-1, 0, -r) -> top 2 = {0, -r}: mu = -r/2, sd = r/2. Raw e.t2 = -1:
    #   enroll side (-1 - (1 + r)/2) / ((1 - r)/2) = -(7 + 4*sqrt(2)),
    #   test side (-1 + r/2) / (r/2) = 1 - 2*sqrt(2); average = -3 - 3*sqrt(2) = -7.2426...
    expected = [-(3 + 2 * math.sqrt(2)), -3 - 3 * math.sqrt(2)]
    dims = [2, 3]
    raw = scoring.score_trials(emb, enroll, test, dims)
    np.testing.assert_allclose(raw[0], [0.0, -1.0], atol=1e-7)
    normed = scoring.asnorm(raw, emb, enroll, test, cohort, topk=2, dims=dims)
    np.testing.assert_allclose(normed[0], expected, rtol=1e-6)
    # With top-k = K the same formula is S-Norm; here the d=2 enroll stats become
    # mu = (1 + 0 + r)/3 over all three cohort scores: check one side against numpy.
    mu, sd = scoring.cohort_stats(emb, cohort, [2], topk=3)
    assert mu[0, 0] == pytest.approx((1 + r) / 3)
    assert sd[0, 0] == pytest.approx(np.std([1.0, 0.0, r]))


def test_asnorm_matches_loop_with_centering():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(12, 10))
    cohort = rng.normal(size=(9, 10))
    mean = rng.normal(size=10) * 0.1
    enroll, test = rng.integers(0, 12, 30), rng.integers(0, 12, 30)
    dims, topk = [4, 10], 4
    raw = scoring.score_trials(emb, enroll, test, dims, mean=mean)
    got = scoring.asnorm(raw, emb, enroll, test, cohort, topk, dims, mean=mean)

    def stats(v, d):
        s = sorted(
            ((v[:d] - mean[:d]) @ (c[:d] - mean[:d]))
            / (np.linalg.norm(v[:d] - mean[:d]) * np.linalg.norm(c[:d] - mean[:d]))
            for c in cohort
        )[-topk:]
        return np.mean(s), np.std(s)

    for i, d in enumerate(dims):
        for j, (e, t) in enumerate(zip(enroll, test)):
            (me, se), (mt, st) = stats(emb[e], d), stats(emb[t], d)
            ref = 0.5 * ((raw[i, j] - me) / se + (raw[i, j] - mt) / st)
            assert got[i, j] == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_asnorm_bad_topk():
    emb = np.eye(3)
    with pytest.raises(ScoringError, match=r"top-k must be in \[2, 3\]"):
        scoring.cohort_stats(emb, np.eye(3), [3], topk=300)


def test_snorm_hand_case():
    # d = 2 (the third coordinate must not matter): e = (1, 0), t = (0, 1);
    # cohort c1 = (1, 0), c2 = (0, 1), c3 = (-1, 0), all three used.
    emb = np.array([[1.0, 0.0, 5.0], [0.0, 1.0, -3.0]])
    cohort = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.5], [-1.0, 0.0, 9.0]])
    # e vs cohort: (1, 0, -1) -> mu 0, sd sqrt(2/3).
    # t vs cohort: (0, 1, 0)  -> mu 1/3, sd sqrt(((1/3)^2 + (2/3)^2 + (1/3)^2) / 3) = sqrt(2)/3.
    # Trial (e, t), raw 0: ((0 - 0)/sqrt(2/3) + (0 - 1/3)/(sqrt(2)/3)) / 2 = -1/(2 sqrt(2)).
    # Trial (e, e), raw 1: both sides (1 - 0)/sqrt(2/3) = sqrt(3/2).
    # Trial (t, t), raw 1: both sides (1 - 1/3)/(sqrt(2)/3) = sqrt(2).
    enroll, test = np.array([0, 0, 1]), np.array([1, 0, 1])
    raw = scoring.score_trials(emb, enroll, test, [2])
    np.testing.assert_allclose(raw[0], [0.0, 1.0, 1.0], atol=1e-7)
    got = scoring.snorm(raw, emb, enroll, test, cohort, [2])
    np.testing.assert_allclose(got[0], [-1 / (2 * math.sqrt(2)), math.sqrt(1.5), math.sqrt(2)], rtol=1e-6)
    # S-Norm is AS-Norm with top-k = the cohort size.
    np.testing.assert_allclose(got, scoring.asnorm(raw, emb, enroll, test, cohort, 3, [2]), rtol=1e-12)


def test_snorm_refuses_a_one_row_cohort():
    emb = np.eye(2)
    raw = scoring.score_trials(emb, [0], [1], [2])
    with pytest.raises(ScoringError, match="K >= 2"):
        scoring.snorm(raw, emb, np.array([0]), np.array([1]), np.ones((1, 2)), [2])
