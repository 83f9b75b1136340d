"""Score calibration: cosine scores (plus quality measures) -> log-likelihood ratios, per dim.

A cosine score has no absolute meaning: the threshold that gives 1% false accepts moves
with the model, the dim and the data. Calibration maps it to a natural-log likelihood
ratio ``llr = log p(s | same speaker) / p(s | different)``, whose Bayes threshold for a
prior and costs is fixed by decision theory (:func:`mrlcache.metrics.bayes_threshold`).

The map is linear in the score and in a few *quality measures* q_k (a quality-measure
function, QMF; the approach of the BOSARIS / FoCal toolkits, Brümmer & du Preez 2006,
and of the WeSpeaker and ESPnet VoxCeleb recipes)::

    llr = a * score + b + sum_k w_k * q_k          (one (a, b, w) per Matryoshka dim)

with quality measures such as the log durations of the two utterances
(``log_dur_enroll``, ``log_dur_test``) and, with AS-Norm, the mean of each side's top-k
cohort scores (``cohort_mu_enroll``, ``cohort_mu_test``). The parameters minimise the
prior-weighted Cllr at a chosen prior ``pi`` (logistic regression with prior weighting)::

    C(a, b, w) = pi / N_tar * sum_tar log(1 + exp(-(llr + logit pi)))
               + (1 - pi) / N_non * sum_non log(1 + exp(llr + logit pi))

The offset ``logit pi`` makes ``llr`` a likelihood ratio rather than a posterior log-odds,
so the same LLRs serve every prior at decision time. Features are standardised before
the L-BFGS fit and a tiny ridge (1e-9 on the standardised weights, not the offset) keeps
the solution finite on separable trials (the cost is divided by its value at llr = 0); the fit is refused if ``a <= 0`` (the map must
be increasing in the score, so EER and minDCF are unchanged by it when there are no
quality measures).

Calibration trials must come from *training* speakers (:func:`make_calibration_trials`),
never from the evaluation list: parameters fitted on the list they are judged on make
Cllr and actDCF look better than they will be on new data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrlcache.trials import Trials

FORMAT = "mrlcache-calibration"
VERSION = 1
RIDGE = 1e-9  # on standardised weights, relative to the cost of llr = 0; matters only on separable trials
FAR_POINTS = 60  # false-accept rates stored per dim for threshold(far=...)


class CalibrationError(ValueError):
    """Trials, scores or a calibration file that cannot be used; the message names the fix."""


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _check_prior(prior) -> float:
    if not 0.0 < float(prior) < 1.0:
        raise CalibrationError(f"prior must be in (0, 1), got {prior}")
    return float(prior)


def fit_linear(scores, labels, quality=None, prior: float = 0.01) -> tuple[float, float, np.ndarray]:
    """Minimise the prior-weighted Cllr of ``a * score + b + quality @ w`` (see the module docstring).

    Args:
        scores: (T,) scores; labels: (T,) 1 target, 0 non-target.
        quality: (T, K) quality measures, or None (K = 0).
        prior: the target prior pi the cost is weighted at.
    Returns:
        (a, b, w (K,)) in the units of the raw score and quality measures.
    """
    from scipy.optimize import minimize

    prior = _check_prior(prior)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) == 1
    q = np.zeros((s.size, 0)) if quality is None else np.asarray(quality, dtype=np.float64).reshape(s.size, -1)
    n_tar, n_non = int(y.sum()), int((~y).sum())
    if n_tar == 0 or n_non == 0:
        raise CalibrationError(f"calibration needs target and non-target trials, got {n_tar} and {n_non}")
    if not (np.isfinite(s).all() and np.isfinite(q).all()):
        raise CalibrationError("scores and quality measures must be finite")
    x = np.column_stack([s, q])  # (T, 1 + K)
    mu, sd = x.mean(axis=0), x.std(axis=0)
    if sd[0] == 0:
        raise CalibrationError("every calibration score is the same: nothing to calibrate")
    sd[sd == 0] = 1.0  # a constant quality measure: its weight stays 0 (the offset absorbs it)
    z = (x - mu) / sd
    # Per-trial weights: pi / N_tar for targets, (1 - pi) / N_non for non-targets, divided
    # by the cost of llr = 0 (the prior's entropy) so the ridge means the same at any prior.
    entropy = -prior * math.log(prior) - (1.0 - prior) * math.log1p(-prior)
    weight = np.where(y, prior / n_tar, (1.0 - prior) / n_non) / entropy
    sign = np.where(y, -1.0, 1.0)  # target cost softplus(-(l + o)), non-target softplus(l + o)
    offset = _logit(prior)

    def cost(theta):
        v = sign * (z @ theta[1:] + theta[0] + offset)  # (T,)
        c = weight @ np.logaddexp(0.0, v) + RIDGE * theta[1:] @ theta[1:]
        g_l = weight * sign * 0.5 * (1.0 + np.tanh(0.5 * v))  # d cost / d llr; sigmoid(v) via tanh
        grad = np.concatenate([[g_l.sum()], z.T @ g_l + 2.0 * RIDGE * theta[1:]])
        return c, grad

    start = np.zeros(1 + x.shape[1])
    start[1] = 1.0
    result = minimize(cost, start, jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-10})
    theta = result.x
    w = theta[1:] / sd  # back to raw units
    b = theta[0] - w @ mu
    return float(w[0]), float(b), w[1:]


def _far_table(llr_non: np.ndarray) -> list[list[float]]:
    """[[far, threshold], ...]: accept ``llr >= threshold`` lets through ``far`` of these non-targets."""
    top = np.sort(llr_non)[::-1]
    ks = np.unique(np.round(np.geomspace(1, top.size, FAR_POINTS)).astype(int))
    return [[k / top.size, float(top[k - 1])] for k in ks]


@dataclass
class Calibration:
    """Per-dim linear calibration to LLRs.

    prior: target prior the parameters were fitted at; quality: names of the quality
    measures, in the order of each dim's ``w``; params: {dim: {"a", "b", "w": [...],
    "far": [[far, llr threshold], ...]}}; info: provenance (trials, cache, counts, Cllr).
    """

    prior: float
    quality: list[str]
    params: dict[int, dict]
    info: dict = field(default_factory=dict)

    @property
    def dims(self) -> list[int]:
        return sorted(self.params)

    def _params(self, dim) -> dict:
        if int(dim) not in self.params:
            raise CalibrationError(f"dim {dim}: this calibration covers dims {self.dims} only")
        return self.params[int(dim)]

    def apply(self, scores, dim: int, quality: dict | None = None) -> np.ndarray:
        """Scores (T,) at ``dim`` -> (T,) float64 LLRs.

        Args:
            quality: {name: (T,)} for every name in :attr:`quality` (extra names refused).
        """
        p = self._params(dim)
        s = np.asarray(scores, dtype=np.float64)
        quality = dict(quality or {})
        missing = [n for n in self.quality if n not in quality]
        extra = [n for n in quality if n not in self.quality]
        if missing or extra:
            raise CalibrationError(
                f"the calibration was fitted with quality measures {self.quality}; "
                f"missing {missing}, unexpected {extra}"
            )
        llr = p["a"] * s + p["b"]
        for name, w in zip(self.quality, p["w"]):
            q = np.asarray(quality[name], dtype=np.float64)
            if q.shape != s.shape:
                raise CalibrationError(f"quality measure {name} has shape {q.shape}, the scores {s.shape}")
            llr = llr + w * q
        return llr

    def threshold(self, dim: int | None = None, *, p_target: float | None = None, c_miss: float = 1.0,
                  c_fa: float = 1.0, far: float | None = None) -> float:
        """LLR threshold (accept if ``llr >= threshold``) for a prior and costs, or for a false-accept rate.

        The prior threshold is the Bayes one and the same for every dim. The ``far``
        threshold is estimated on the calibration trials' non-targets of ``dim``
        (interpolated in log false-accept rate between the stored points).
        """
        from mrlcache.metrics import MetricsError, bayes_threshold

        if (p_target is None) == (far is None):
            raise CalibrationError("give exactly one of p_target (a prior) or far (a false-accept rate)")
        if p_target is not None:
            try:
                return bayes_threshold(p_target, c_miss, c_fa)
            except MetricsError as err:
                raise CalibrationError(str(err)) from None
        table = np.asarray(self._params(self.dims[-1] if dim is None else dim)["far"])  # (P, 2)
        lo, hi = table[0, 0], table[-1, 0]
        if not lo <= far < 1.0:
            raise CalibrationError(
                f"far {far}: the calibration trials support false-accept rates in [{lo:.3g}, 1) "
                f"({round(1 / lo)} non-targets); make more calibration trials for a lower rate"
            )
        return float(np.interp(math.log(far), np.log(table[:, 0]), table[:, 1])) if far <= hi else float(table[-1, 1])

    def check(self, *, model_sha256=None, dims=(), center=None, asnorm=None, snorm=None,
              durations: bool = False) -> None:
        """Refuse, in one line naming the option, scores made otherwise than the calibration's.

        Args:
            model_sha256: SHA-256 of the model file scored; dims: the dims to calibrate.
            center: resolved path of the centering cache, or None; asnorm: {"cohort": path,
                "topk": k} or None; snorm: {"cohort": path} or None (as ``info`` records them).
            durations: whether the caller can give log durations (``--data``).
        """
        want = self.info.get("model_sha256")
        if model_sha256 is not None and want is None:
            raise CalibrationError("the calibration records no model SHA-256, so it cannot be checked against "
                                   "this model; run 'mrlcache calibrate' for this model")
        if model_sha256 is not None and want != model_sha256:
            raise CalibrationError(f"the calibration was fitted for another model.pt (SHA-256 {want[:16]}..., "
                                   f"this one {model_sha256[:16]}...); run 'mrlcache calibrate' for this model")
        missing = [int(d) for d in dims if int(d) not in self.params]
        if missing:
            raise CalibrationError(f"the calibration covers dims {self.dims}, not {missing}; "
                                   f"pass --dims within them or calibrate those dims")
        for key, option, given in (("center", "--center", center), ("asnorm", "--asnorm-cohort", asnorm),
                                   ("snorm", "--snorm-cohort", snorm)):
            fitted = self.info.get(key) or None
            if fitted != given:
                def show(v):
                    return "none" if v is None else v if isinstance(v, str) else \
                        v["cohort"] + (f" (top-{v['topk']})" if "topk" in v else "")
                raise CalibrationError(f"the calibration was fitted with {option} {show(fitted)}, these scores "
                                       f"use {show(given)}; score with the same {option} or calibrate again")
        if not durations and any(n.startswith("log_dur") for n in self.quality):
            raise CalibrationError("the calibration uses utterance durations (fitted with --data): "
                                   "pass --data AUDIO_ROOT so they can be read")

    def to_json(self, path) -> Path:
        """Write the calibration as JSON (atomically); returns the path."""
        from mrlcache.runtime import atomic_write

        obj = {"format": FORMAT, "version": VERSION, "prior": self.prior, "quality": list(self.quality),
               "dims": {str(d): self.params[d] for d in self.dims}, "info": self.info}
        path = Path(path)
        atomic_write(path, json.dumps(obj, indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path) -> Calibration:
        """Read a file written by :meth:`to_json`; CalibrationError naming the file on any defect.

        Strict: the format, version, every parameter and the ``info`` block with the
        ``model_sha256`` of the model it was fitted for are required (a file stripped of
        them could otherwise be applied to any model).
        """
        path = Path(path)
        try:
            from mrlcache.runtime import read_text

            obj = json.loads(read_text(path))
        except FileNotFoundError:
            raise CalibrationError(f"{path}: no such calibration file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CalibrationError(f"{path}: not a calibration file ({err}); "
                                   f"write one with 'mrlcache calibrate'") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise CalibrationError(f"{path}: not an mrlcache calibration file; write one with 'mrlcache calibrate'")
        if obj.get("version") != VERSION:
            raise CalibrationError(f"{path}: calibration format version {obj.get('version')} "
                                   f"(this mrlcache reads {VERSION})")
        try:
            prior = _check_prior(obj["prior"])
            quality = [str(n) for n in obj["quality"]]
            params = {}
            for d, p in obj["dims"].items():
                entry = {"a": float(p["a"]), "b": float(p["b"]), "w": [float(v) for v in p["w"]],
                         "far": [[float(f), float(t)] for f, t in p["far"]]}
                values = [entry["a"], entry["b"], *entry["w"], *(v for row in entry["far"] for v in row)]
                if not all(math.isfinite(v) for v in values):
                    raise ValueError(f"dim {d} has non-finite parameters")
                if entry["a"] <= 0:
                    raise ValueError(f"dim {d} has score weight a = {entry['a']} (must be > 0)")
                if len(entry["w"]) != len(quality):
                    raise ValueError(f"dim {d} has {len(entry['w'])} quality weights for {len(quality)} measures")
                if not entry["far"]:
                    raise ValueError(f"dim {d} has no false-accept table")
                params[int(d)] = entry
            if not params:
                raise ValueError("no dims")
            info = obj["info"]
            if not isinstance(info, dict):
                raise ValueError("its info block is not a mapping")
            sha = info["model_sha256"]  # a calibration is only ever applied to the model it was fitted for
            if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                raise ValueError(f"model_sha256 {sha!r} is not a SHA-256")
        except (KeyError, TypeError, ValueError, CalibrationError) as err:
            what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
            raise CalibrationError(f"{path}: damaged calibration file ({what}); "
                                   f"write it again with 'mrlcache calibrate'") from None
        return cls(prior, quality, params, dict(info))


def fit_calibration(scores, labels, dims, quality: dict | None = None, prior: float = 0.01,
                    info: dict | None = None) -> Calibration:
    """Fit one linear calibration per dim.

    Args:
        scores: (len(dims), T) scores, rows in the order of ``dims``; labels: (T,) 1/0.
        quality: {name: (T,) or (len(dims), T)} quality measures (per-dim rows, or one row for all).
        prior: target prior of the prior-weighted Cllr.
        info: provenance stored with the calibration.
    Returns:
        :class:`Calibration`; ``info`` gains per-dim Cllr before (scores taken as LLRs) and after.
    """
    from mrlcache import metrics

    scores = np.asarray(scores, dtype=np.float64)
    dims = [int(d) for d in dims]
    labels = np.asarray(labels)
    if scores.shape != (len(dims), labels.size):
        raise CalibrationError(f"scores {scores.shape} do not match {len(dims)} dims x {labels.size} trials")
    quality = dict(quality or {})
    rows = {}
    for name, q in quality.items():
        q = np.asarray(q, dtype=np.float64)
        if q.shape == (labels.size,):
            q = np.broadcast_to(q, scores.shape)
        if q.shape != scores.shape:
            raise CalibrationError(f"quality measure {name} has shape {q.shape}; expected ({labels.size},) "
                                   f"or {scores.shape}")
        rows[name] = q
    names = list(rows)
    params, cllr_report = {}, {}
    for i, d in enumerate(dims):
        q = np.column_stack([rows[n][i] for n in names]) if names else None
        a, b, w = fit_linear(scores[i], labels, q, prior)
        if a <= 0:
            raise CalibrationError(
                f"dim {d}: the fitted score weight is {a:.3g} <= 0 (the scores do not rank targets above "
                f"non-targets on these trials); check the trials' labels and the model"
            )
        llr = a * scores[i] + b + (q @ w if names else 0.0)
        params[d] = {"a": a, "b": b, "w": [float(v) for v in w], "far": _far_table(llr[labels == 0])}
        cllr_report[str(d)] = {"cllr_raw": metrics.cllr(scores[i], labels), "cllr": metrics.cllr(llr, labels),
                               "min_cllr": metrics.min_cllr(scores[i], labels)}
    out_info = {**(info or {}), "n_target": int((labels == 1).sum()), "n_nontarget": int((labels == 0).sum()),
                "fit": cllr_report}
    return Calibration(_check_prior(prior), names, params, out_info)


def _video(utt_id: str) -> str | None:
    """The video of a VoxCeleb-style id ``speaker/video/utt``, or None for other layouts."""
    parts = utt_id.split("/")
    return "/".join(parts[:-1]) if len(parts) >= 3 else None


def make_calibration_trials(utt_ids, speakers, n: int, seed: int = 0) -> Trials:
    """A balanced trial list from training utterances: n // 2 targets, the rest non-targets.

    Targets pair two utterances of one speaker (speakers drawn uniformly); where a speaker
    has utterances from several videos (ids ``speaker/video/utt``), the two come from
    different videos, so a target is not just "same recording". Non-targets pair
    utterances of two speakers drawn uniformly. No pair appears twice.

    Args:
        utt_ids, speakers: the utterances and their speaker labels (e.g. a cache's).
        n: number of trials (>= 2); seed: the random generator's seed.
    Returns:
        :class:`mrlcache.trials.Trials`, shuffled; the same arguments give the same list.
    """
    utt_ids, speakers = list(utt_ids), list(speakers)
    if len(utt_ids) != len(speakers):
        raise CalibrationError(f"{len(utt_ids)} utterances but {len(speakers)} speaker labels")
    if any(s in (None, "") for s in speakers):
        raise CalibrationError("calibration trials need a speaker label for every utterance")
    if n < 2:
        raise CalibrationError(f"need at least 2 calibration trials, got {n}")
    by_spk: dict[str, list[str]] = {}
    for u, s in zip(utt_ids, speakers):
        by_spk.setdefault(s, []).append(u)
    names = sorted(by_spk)
    if len(names) < 2:
        raise CalibrationError(f"calibration trials need at least 2 speakers, found {len(names)}")
    n_tar, n_non = n // 2, n - n // 2

    videos = {s: len({_video(u) for u in by_spk[s]}) for s in names}

    def capacity(s):  # distinct allowed target pairs of one speaker
        utts = by_spk[s]
        if videos[s] < 2:
            return len(utts) * (len(utts) - 1) // 2
        counts = np.unique([_video(u) for u in utts], return_counts=True)[1]
        return (len(utts) ** 2 - int((counts**2).sum())) // 2  # pairs across videos

    cap = {s: capacity(s) for s in names}
    if sum(cap.values()) < n_tar:
        raise CalibrationError(f"{n} trials need {n_tar} distinct target pairs, but the utterances allow "
                               f"{sum(cap.values())}; ask for fewer trials or use a larger cache")
    rng = np.random.default_rng(seed)
    pairs: dict[tuple[str, str], int] = {}  # (utt, utt) sorted -> label
    used = dict.fromkeys(names, 0)
    open_ = [s for s in names if cap[s] > 0]
    while len(pairs) < n_tar:
        s = open_[rng.integers(len(open_))]
        utts = by_spk[s]
        a, b = rng.choice(len(utts), 2, replace=False)
        if videos[s] > 1 and _video(utts[a]) == _video(utts[b]):
            continue  # this speaker has several videos: targets must cross them
        key = (min(utts[a], utts[b]), max(utts[a], utts[b]))
        if key not in pairs:
            pairs[key] = 1
            used[s] += 1
            if used[s] == cap[s]:  # every allowed pair of s drawn: stop drawing s
                open_.remove(s)
    all_pairs = sum(len(by_spk[s]) * (len(utt_ids) - len(by_spk[s])) for s in names) // 2
    if all_pairs < n_non:
        raise CalibrationError(f"{n} trials need {n_non} distinct non-target pairs, the utterances allow {all_pairs}")
    while sum(1 for v in pairs.values() if v == 0) < n_non:
        sa, sb = rng.choice(len(names), 2, replace=False)
        ua = by_spk[names[sa]][rng.integers(len(by_spk[names[sa]]))]
        ub = by_spk[names[sb]][rng.integers(len(by_spk[names[sb]]))]
        pairs.setdefault((min(ua, ub), max(ua, ub)), 0)
    keys = list(pairs)
    order = rng.permutation(len(keys))
    labels = np.array([pairs[keys[i]] for i in order], dtype=np.int8)
    return Trials(labels, [keys[i][0] for i in order], [keys[i][1] for i in order])
