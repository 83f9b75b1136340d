"""Verification metrics: EER, minimum and actual detection cost, Cllr and minCllr.

Pure numpy functions of ``scores`` (higher means "same speaker") and ``labels`` (1 target,
0 non-target). A trial is accepted when ``score >= threshold``. EER, minDCF and the
detection curve walk the same exact operating points:

* the scores are sorted once; trials with equal scores are grouped so the curve moves one
  step per *distinct* score (no binning, no dependence on the order of tied trials);
* point 0 is "reject everything" (threshold +inf: P_miss = 1, P_fa = 0), point k >= 1
  accepts every trial whose score is >= the k-th largest distinct score, and the last
  point accepts everything (P_miss = 0, P_fa = 1).

EER convention (the NIST SRE scoring tool's, also used by WeSpeaker): the miss and
false-alarm rates cross between two consecutive operating points A (P_miss >= P_fa) and
B (P_miss < P_fa); the EER is where the straight segment A-B meets P_miss = P_fa. The
threshold returned with it is the score threshold of whichever of A and B lies nearer
the crossing (smaller |P_miss - P_fa|; B on a tie), so ``score >= threshold`` is a
realisable operating point next to the EER. See ``docs/metrics.md`` for how other
toolkits differ (Kaldi: no interpolation; voxceleb_trainer: max of the two rates at the
closest point).

minDCF convention (NIST SRE, Kaldi ``compute_min_dcf.py``, WeSpeaker, voxceleb_trainer):
min over operating points of ``c_miss * p_target * P_miss + c_fa * (1 - p_target) * P_fa``
divided by ``min(c_miss * p_target, c_fa * (1 - p_target))``, the cost of the best
trivial system. SpeechBrain's ``minDCF`` reports the same minimum *unnormalised*.

Calibrated scores are natural-log likelihood ratios ``llr = log p(s | target) /
p(s | non-target)``. For them:

* ``act_dcf``: the same normalised DCF at the one threshold Bayes decision theory fixes
  for LLRs. Accepting costs ``c_fa * (1 - p_target) * p(s | non)``, rejecting costs
  ``c_miss * p_target * p(s | tar)``; accepting is the cheaper decision when
  ``llr >= log(c_fa * (1 - p_target) / (c_miss * p_target))
  = -logit(p_target) + log(c_fa / c_miss)`` (logit(p) = log(p / (1 - p))). A
  well-calibrated system has actDCF close to its minDCF; the gap is the calibration loss.
* ``cllr`` (Brümmer & du Preez, "Application-independent evaluation of speaker detection",
  Computer Speech and Language 20, 2006): ``Cllr = (mean_tar log2(1 + exp(-llr)) +
  mean_non log2(1 + exp(llr))) / 2``, in bits; 1 for the useless system llr = 0, 0 for a
  perfect one, unbounded for confidently wrong scores.
* ``min_cllr``: Cllr after the best monotone (non-decreasing) map of the scores, found by
  the pool-adjacent-violators algorithm (PAV; Ayer et al. 1955; its use here: Brümmer &
  du Preez 2006, and van Leeuwen & Brümmer, "An introduction to application-independent
  evaluation of speaker recognition systems", Speaker Classification I, LNCS 4343, 2007,
  and the BOSARIS toolkit). PAV fits a non-decreasing posterior ``P(target | s)`` to the
  labels sorted by score; trials with equal scores form one block first (a monotone map
  gives them one value, so their order cannot matter). The posterior log-odds of each
  block minus the empirical prior log-odds ``log(n_tar / n_non)`` is its optimal LLR;
  minCllr is the Cllr of those LLRs. It depends only on the order of the scores: it is
  invariant under every strictly increasing map, and ``Cllr - minCllr`` is the
  calibration loss.

Speed: 550,000 trials (67,711 distinct scores) take about 0.08 s for ``eer`` and as much
for ``min_dcf`` on one shared CPU core, about 0.12 s for ``min_cllr`` (PAV loop over the
distinct scores) (``benchmarks/bench_metrics.py``); the sort dominates.
"""

from __future__ import annotations

import numpy as np


class MetricsError(ValueError):
    """Scores or labels that no verification metric can be computed from."""


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (float64 scores (N,), bool labels (N,))."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        raise MetricsError(
            f"scores and labels must be 1-D, got shapes {scores.shape} and {labels.shape}"
        )
    if scores.shape != labels.shape:
        raise MetricsError(f"{scores.size} scores but {labels.size} labels")
    if scores.size == 0:
        raise MetricsError("no trials: scores and labels are empty")
    if not (np.issubdtype(scores.dtype, np.number) or scores.dtype == bool):
        raise MetricsError(f"scores must be numeric, got dtype {scores.dtype}")
    scores = scores.astype(np.float64, copy=False)
    n_nan = int(np.count_nonzero(np.isnan(scores)))
    if n_nan:
        raise MetricsError(f"{n_nan} of {scores.size} scores are NaN")
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == bool):
        raise MetricsError(f"labels must be 0/1, got dtype {labels.dtype}")
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        values = np.unique(labels[bad])[:5].tolist()
        raise MetricsError(f"labels must be 0 or 1, found {values}")
    labels = labels == 1
    n_tar = int(np.count_nonzero(labels))
    if n_tar == 0:
        raise MetricsError(f"no target trials among {labels.size} (all labels are 0)")
    if n_tar == labels.size:
        raise MetricsError(f"no non-target trials among {labels.size} (all labels are 1)")
    return scores, labels


def _operating_points(scores, labels):
    """Exact operating points, one per distinct score plus "reject everything".

    Returns thresholds (K+1,) float64 descending (thresholds[0] = +inf), the number of
    accepted targets and non-targets at each (K+1,) int64, and (n_tar, n_non).
    """
    scores, labels = _check(scores, labels)
    order = np.argsort(scores, kind="stable")[::-1]  # descending
    s = scores[order]
    y = labels[order]
    tar = np.cumsum(y, dtype=np.int64)  # targets accepted with threshold s[i]
    non = np.arange(1, s.size + 1, dtype=np.int64) - tar
    # The last trial of each group of equal scores: a threshold equal to that score
    # accepts the whole group, so the curve moves once per distinct score.
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    zero = np.zeros(1, dtype=np.int64)
    thresholds = np.concatenate([[np.inf], s[last]])
    tar_acc = np.concatenate([zero, tar[last]])
    non_acc = np.concatenate([zero, non[last]])
    return thresholds, tar_acc, non_acc, int(tar[-1]), int(non[-1])


def detection_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact miss / false-alarm rates at every distinct threshold.

    Args:
        scores: (N,) scores, higher = more likely the same speaker.
        labels: (N,) 1 for target trials, 0 for non-target trials.
    Returns:
        thresholds (K+1,) descending, starting at +inf (reject all); p_miss (K+1,) and
        p_fa (K+1,) for the rule "accept if score >= threshold".
    """
    thresholds, tar_acc, non_acc, n_tar, n_non = _operating_points(scores, labels)
    return thresholds, (n_tar - tar_acc) / n_tar, non_acc / n_non


def eer(scores, labels) -> tuple[float, float]:
    """Equal error rate, exact and interpolated between the two bracketing operating points.

    Args:
        scores: (N,) scores, higher = more likely the same speaker.
        labels: (N,) 1 for target trials, 0 for non-target trials.
    Returns:
        (eer, threshold): eer as a fraction in [0, 1]; threshold of the operating point
        nearest the crossing (accept if score >= threshold). See the module docstring.
    """
    return _eer_at(*_operating_points(scores, labels))


def _eer_at(thresholds, tar_acc, non_acc, n_tar, n_non) -> tuple[float, float]:
    """:func:`eer` from the operating points of :func:`_operating_points`."""
    # P_miss - P_fa in integer arithmetic (scaled by n_tar * n_non), so the bracket is
    # found exactly; it decreases strictly from n_tar*n_non (reject all) to -n_tar*n_non.
    diff = (n_tar - tar_acc) * n_non - non_acc * n_tar
    a = int(np.count_nonzero(diff >= 0)) - 1  # last point with P_miss >= P_fa
    b = a + 1  # first point with P_miss < P_fa (exists: the last point has diff < 0)
    p_miss = (n_tar - tar_acc[[a, b]]) / n_tar
    p_fa = non_acc[[a, b]] / n_non
    # Walk from A to B: P_miss - P_fa goes linearly from diff[a] >= 0 to diff[b] < 0.
    t = diff[a] / (diff[a] - diff[b])
    value = p_miss[0] + t * (p_miss[1] - p_miss[0])
    threshold = thresholds[a] if abs(diff[a]) < abs(diff[b]) else thresholds[b]
    return float(value), float(threshold)


def min_dcf(scores, labels, p_target=0.01, c_miss=1.0, c_fa=1.0) -> float:
    """Minimum normalised detection cost over all exact operating points.

    Args:
        scores: (N,) scores, higher = more likely the same speaker.
        labels: (N,) 1 for target trials, 0 for non-target trials.
        p_target: prior probability of a target trial, in (0, 1).
        c_miss, c_fa: costs of a miss and of a false alarm (> 0).
    Returns:
        min_t DCF(t) / min(c_miss * p_target, c_fa * (1 - p_target)); 1.0 means no better
        than always accepting or always rejecting.
    """
    _check_costs(p_target, c_miss, c_fa)
    return _min_dcf_at(_operating_points(scores, labels), p_target, c_miss, c_fa)


def _min_dcf_at(points, p_target, c_miss, c_fa) -> float:
    """:func:`min_dcf` from the operating points of :func:`_operating_points`."""
    _, tar_acc, non_acc, n_tar, n_non = points
    p_miss = (n_tar - tar_acc) / n_tar
    p_fa = non_acc / n_non
    dcf = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    return float(dcf.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))


def eer_min_dcf(scores, labels, p_targets=(0.01, 0.05)) -> tuple[float, float, list[float]]:
    """:func:`eer` and :func:`min_dcf` at each prior (c_miss = c_fa = 1) from one sort of the scores.

    Returns:
        (eer, threshold, [min_dcf at each of ``p_targets``]), exactly the values of the
        separate functions.
    """
    for p in p_targets:
        _check_costs(p, 1.0, 1.0)
    points = _operating_points(scores, labels)
    return (*_eer_at(*points), [_min_dcf_at(points, p, 1.0, 1.0) for p in p_targets])


def _check_costs(p_target, c_miss, c_fa) -> None:
    if not 0.0 < p_target < 1.0:
        raise MetricsError(f"p_target must be in (0, 1), got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise MetricsError(f"costs must be positive, got c_miss={c_miss}, c_fa={c_fa}")


def bayes_threshold(p_target, c_miss=1.0, c_fa=1.0) -> float:
    """LLR threshold of the Bayes decision: accept if ``llr >= -logit(p_target) + log(c_fa / c_miss)``."""
    _check_costs(p_target, c_miss, c_fa)
    return float(np.log(c_fa * (1.0 - p_target)) - np.log(c_miss * p_target))


def act_dcf(llr, labels, p_target=0.01, c_miss=1.0, c_fa=1.0) -> float:
    """Actual normalised detection cost of LLR scores at the Bayes threshold.

    Args:
        llr: (N,) natural-log likelihood ratios; labels: (N,) 1 target, 0 non-target.
        p_target, c_miss, c_fa: as :func:`min_dcf`.
    Returns:
        DCF(bayes_threshold) / min(c_miss * p_target, c_fa * (1 - p_target)); >= min_dcf.
    """
    threshold = bayes_threshold(p_target, c_miss, c_fa)
    llr, labels = _check(llr, labels)
    accept = llr >= threshold
    p_miss = np.count_nonzero(labels & ~accept) / np.count_nonzero(labels)
    p_fa = np.count_nonzero(~labels & accept) / np.count_nonzero(~labels)
    dcf = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    return float(dcf / min(c_miss * p_target, c_fa * (1.0 - p_target)))


def cllr(llr, labels) -> float:
    """Log-likelihood-ratio cost (bits) of natural-log LLR scores; see the module docstring.

    Args:
        llr: (N,) natural-log likelihood ratios (+-inf allowed); labels: (N,) 1/0.
    Returns:
        Cllr >= 0; 1.0 for llr = 0 everywhere; inf if a target has llr -inf (or a
        non-target +inf).
    """
    llr, labels = _check(llr, labels)
    # log(1 + exp(x)) without overflow: logaddexp(0, x); +-inf give inf and 0 exactly.
    c_tar = np.logaddexp(0.0, -llr[labels]).mean()
    c_non = np.logaddexp(0.0, llr[~labels]).mean()
    return float((c_tar + c_non) / (2.0 * np.log(2.0)))


def _pav_blocks(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool-adjacent-violators on trials sorted by score, ties pooled first.

    Returns, per final block in increasing score order, (last score index into the
    distinct ascending scores (B,), targets (B,), trials (B,)); the block's fitted
    posterior is targets / trials, non-decreasing along the blocks.
    """
    scores, labels = _check(scores, labels)
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order]
    # One starting block per distinct score (ties share the value a monotone map gives them).
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # last trial of each distinct score
    tar_cum = np.cumsum(y, dtype=np.int64)[ends]
    n_tar = np.diff(np.concatenate([[0], tar_cum]))
    n_all = np.diff(np.concatenate([[0], ends + 1]))
    # Stack of merged blocks; a new block is merged backwards while it is not above the
    # previous one (t1 / n1 >= t2 / n2, compared in integers: t1 * n2 >= t2 * n1).
    st_t, st_n, st_end = [], [], []
    for k, (t, n) in enumerate(zip(n_tar.tolist(), n_all.tolist())):
        while st_t and st_t[-1] * n >= t * st_n[-1]:
            t += st_t.pop()
            n += st_n.pop()
            st_end.pop()
        st_t.append(t)
        st_n.append(n)
        st_end.append(k)
    return np.array(st_end), np.array(st_t, dtype=np.int64), np.array(st_n, dtype=np.int64)


def pav_llr(scores, labels) -> np.ndarray:
    """The optimal monotone LLR of each trial (PAV posterior log-odds minus prior log-odds).

    Args:
        scores: (N,) any scores; labels: (N,) 1/0.
    Returns:
        (N,) float64 LLRs in the trials' order (-inf / +inf for all-non-target / all-target blocks).
    """
    scores, labels = _check(scores, labels)
    ends, t, n = _pav_blocks(scores, labels)
    n_tar = int(np.count_nonzero(labels))
    n_non = labels.size - n_tar
    with np.errstate(divide="ignore"):
        block_llr = np.log(t) - np.log(n - t) - np.log(n_tar / n_non)  # (B,)
    distinct = np.unique(scores)  # ascending, as the blocks
    starts = np.concatenate([[0], ends[:-1] + 1])
    per_distinct = np.repeat(block_llr, ends - starts + 1)  # (K,)
    return per_distinct[np.searchsorted(distinct, scores)]


def min_cllr(scores, labels) -> float:
    """Cllr (bits) after the optimal monotone calibration (PAV); see the module docstring.

    Args:
        scores: (N,) any scores, higher = more likely the same speaker; labels: (N,) 1/0.
    Returns:
        minCllr in [0, 1]: 1 when the scores carry no information, 0 when separable.
    """
    scores, labels = _check(scores, labels)
    _, t, n = _pav_blocks(scores, labels)
    n_tar = int(np.count_nonzero(labels))
    n_non = labels.size - n_tar
    # Per block with posterior p = t / n and prior odds O = n_tar / n_non the LLR is
    # log(p / (1 - p)) - log(O), so a target costs log2(1 + O (1 - p) / p) and a non-target
    # log2(1 + p / (O (1 - p))). Written with counts, a block that holds no targets (p = 0)
    # costs its non-targets nothing, and no 0 * inf appears.
    f = n - t  # non-targets per block
    odds = n_tar / n_non
    tar_cost = np.zeros(t.size)
    non_cost = np.zeros(t.size)
    has_t, has_f = t > 0, f > 0
    tar_cost[has_t] = t[has_t] * np.log1p(odds * f[has_t] / t[has_t])
    non_cost[has_f] = f[has_f] * np.log1p(t[has_f] / (odds * f[has_f]))
    return float((tar_cost.sum() / n_tar + non_cost.sum() / n_non) / (2.0 * np.log(2.0)))
