"""Score a verification trial list with a fitted model: EER and minDCF at every Matryoshka dim.

Every system is a function of the pooled backbone vectors of the trial utterances, which
come from an eval-mode cache (:func:`pooled_from_cache`) or from audio, each file decoded
once (:func:`pooled_from_audio`); both give the same scores:

* ``mrl``: the fitted Matryoshka head (``model.project``), at each requested dim;
* ``raw``: the pooled vectors themselves (one row, at the pooled size);
* ``published``: the checkpoint's own BatchNorm + linear head (one row, usually 192);
* ``pca``: the published embedding reduced by PCA fitted on a training cache, at each
  requested dim up to the published size (what a Matryoshka head has to beat);
* ``lda``: the published embedding (or the head-only model's vector) projected on the LDA
  directions fitted on the same training cache (speakers as classes), truncated per dim;
* ``fixed``: the run's fixed-size heads (``fit --fixed-baselines``, ``RUN/fixed/D/model.pt``
  from :func:`fixed_models`), each scored whole at its own dim; :func:`fixed_ratios` gives
  the EER of ``mrl`` over ``fixed`` per dim (below 1: the nested prefix is better), and
  :func:`best_baseline_ratios` the EER of ``mrl`` over the best other system at each dim.

Scores are cosines of L2-normalised prefixes (:mod:`mrlcache.scoring`), optionally centred
by a training mean and AS-Norm-ed or S-Norm-ed against per-speaker means of a cohort cache
(:func:`cache_stats`). With a :class:`~mrlcache.calibration.Calibration`, the ``mrl``
scores are also mapped to LLRs, with quality measures made exactly as ``mrlcache
calibrate`` makes them (:func:`normalised_scores`, :func:`log_durations`), and scored by
Cllr, minCllr and actDCF. Metrics and conventions: docs/metrics.md. From Python::

    model = load_model("run/model.pt")
    cache = open_cache_for("caches/vox1-eval", model)
    v = pooled_from_cache(cache, read_trials("veri_test2.txt"))
    results = evaluate(v.trials, v.utterances, v.pooled, transforms(model), model.dims)

:class:`mrlcache.scorer.Scorer` sets all of this up once from a model file and options;
``mrlcache eer`` and ``mrlcache calibrate`` use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mrlcache.baselines import (  # noqa: F401 (part of this API)
    FixedHeads,
    best_baseline_ratios,
    fixed_models,
    fixed_ratios,
    lda_from_stats,
)
from mrlcache.trial_vectors import (  # noqa: F401 (part of this API: where the vectors come from)
    EvaluateError,
    MissingUtterancesError,
    CacheRows,
    TrialVectors,
    _note,
    batch_bounds,
    audio_path,
    embeddings_from_cache,
    open_cache_for,
    pooled_from_audio,
    pooled_from_cache,
)
from mrlcache.names import NORMS, SYSTEMS  # noqa: F401 (part of this API)
from mrlcache import streams
from mrlcache.trials import Trials

PRIORS = (0.01, 0.05)  # minDCF and actDCF columns; c_miss = c_fa = 1
BYTES_PER_VALUE = 4  # embeddings are stored and scored as float32


def transforms(model, systems=("mrl",), pca_cache=None, device="cpu", fixed=None) -> dict:
    """The systems to score: name -> function pooled (n, P) float32 -> embeddings (n, D).

    Args:
        model: the fitted model; ``published`` needs its backbone's head; ``pca`` is the PCA of
            the published embedding, or of the pooled vector itself for a head-only model.
        systems: names from :data:`SYSTEMS`, in table order.
        pca_cache: an opened training cache to fit the ``pca`` and ``lda`` systems on (every view).
        fixed: {dim: MRLModel} for the ``fixed`` system (:func:`fixed_models`).
    """
    import torch

    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise EvaluateError(f"unknown system(s) {unknown}: choose from {list(SYSTEMS)}")
    if model.backbone is None and "published" in systems:
        raise EvaluateError("the published system needs the backbone's own head, but this model is head-only")

    def published(pooled):
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32)).to(device)  # (n, P)
            return model.backbone.head(x).cpu().numpy()  # (n, E)

    if not streams.pooled_only(getattr(model, "inputs", streams.POOLED_ONLY)):
        # A model on streams: its TrialVectors hold embeddings already (embeddings_from_cache).
        if set(systems) != {"mrl"}:
            raise EvaluateError(f"systems {[s for s in systems if s != 'mrl']}: this model reads streams "
                                f"{', '.join(model.inputs)}, not the pooled vector; score it alone")
        return {"mrl": lambda emb: np.asarray(emb, dtype=np.float32)}
    out = {"mrl": model.project, "raw": lambda pooled: np.asarray(pooled, dtype=np.float32),
           "published": published}
    if "pca" in systems:
        if pca_cache is None:
            raise EvaluateError("the pca system needs a training cache to fit the PCA on (pca_cache)")
        # PCA of the published embedding; a head-only model (imported vectors, no backbone)
        # has none, so its PCA is of the cached vector itself.
        base = published if model.backbone is not None else out["raw"]
        mean, components = fit_pca(pca_cache, base)
        out["pca"] = lambda p: ((base(p) - mean) @ components).astype(np.float32)  # (n, E)
    if "lda" in systems:
        if pca_cache is None:
            raise EvaluateError("the lda system needs a training cache to fit the LDA on (pca_cache)")
        base = published if model.backbone is not None else out["raw"]
        lda_mean, directions = fit_lda_cache(pca_cache, base)
        out["lda"] = lambda p: ((base(p) - lda_mean) @ directions).astype(np.float32)  # (n, E)
    if "fixed" in systems:
        if not fixed:
            raise EvaluateError("the fixed system needs the run's fixed-size heads: fit with --fixed-baselines")
        out["fixed"] = FixedHeads({d: m.to(device) for d, m in fixed.items()})
    return {s: out[s] for s in systems}


BATCH_VALUES = 1 << 22  # values per batch of batched(): 16 MB of float32, whatever the width


def batched(transform, pooled, batch: int | None = None) -> np.ndarray:
    """``transform(pooled)``, batch by batch: each batch widened to float32 on its own.

    The trial vectors of a cache come in its stored dtype (float16), read shard by shard
    (:class:`~mrlcache.trial_vectors.CacheRows`); widening all of them at once, then
    standardising them inside the head, made several whole float32 copies (145,000 x
    2,304: 1.3 GB each, and fresh memory costs page faults). A batch is about 16 MB of
    float32 (``BATCH_VALUES``; 2,048 x 2,304, 16,384 x 256), small enough for glibc to reuse
    its buffers, large enough that the head's matrix product runs at speed. The batches are
    :func:`~mrlcache.trial_vectors.batch_bounds`'s (one when ``pooled`` has at most
    ``batch`` rows, else at least ``batch // 2`` rows each), so every row's embedding is
    the one the whole matrix gives (tests/test_evaluate_batched.py).

    Args:
        transform: pooled (n, P) float32 -> (n, D), row by row (a system of :func:`transforms`);
        pooled: (U, P) any float dtype, or a CacheRows; batch: rows per batch at most
            (default: ``BATCH_VALUES`` values, at least 2,048 rows).
    Returns:
        (U, D) in the transform's output dtype.
    """
    n = len(pooled)
    batch = batch or max(2048, BATCH_VALUES // max(1, np.shape(pooled)[-1]))
    if hasattr(pooled, "batches"):
        parts = pooled.batches(batch)
    else:
        bounds = batch_bounds(n, batch)
        parts = ((slice(lo, hi), pooled[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:]))
    out = None
    for where, x in parts:
        part = transform(np.asarray(x, dtype=np.float32))  # (n_batch, D)
        if out is None:
            out = np.empty((n, *part.shape[1:]), dtype=part.dtype)
        out[where] = part
    return out if out is not None else transform(np.asarray(pooled, dtype=np.float32))


def _iter_cache(cache, batch: int = 8192):
    """(pooled (n, P) float32, speakers (n,)) over every vector of every view, shard by shard."""
    for shard in cache.iter_shards():
        pooled = shard.read("pooled")  # (n, V, P)
        n, views, dim = pooled.shape
        speakers = np.repeat(np.asarray(shard.speakers, dtype=str), views)
        flat = pooled.reshape(n * views, dim)
        for lo in range(0, flat.shape[0], batch):
            yield flat[lo : lo + batch], speakers[lo : lo + batch]


def fit_pca(cache, published) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the embeddings of every vector of a cache, in one streamed pass.

    Args:
        cache: an opened training cache; published: pooled (n, P) -> embeddings (n, E) (the
            published head, or the identity for a head-only model).
    Returns:
        (mean (E,), components (E, E)), components by column in order of decreasing variance.
    """
    total, outer, n = None, None, 0
    for pooled, _ in _iter_cache(cache):
        e = published(pooled).astype(np.float64)  # (n, E)
        total = e.sum(axis=0) if total is None else total + e.sum(axis=0)
        outer = e.T @ e if outer is None else outer + e.T @ e
        n += e.shape[0]
    if n < 2:
        raise EvaluateError(f"{cache.path}: need at least 2 vectors to fit PCA, found {n}")
    mean = total / n
    cov = outer / n - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(cov)  # ascending
    vectors = vectors[:, ::-1]
    # eigh's signs are arbitrary: make each component's largest coordinate positive so the
    # projection (and its scores) do not depend on the LAPACK build.
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    return mean, vectors * signs


def fit_lda_cache(cache, published) -> tuple[np.ndarray, np.ndarray]:
    """LDA (speakers as classes) of the embeddings of every vector of a cache, in one streamed pass.

    Returns (mean (E,), directions (E, E)) of :func:`mrlcache.baselines.lda_from_stats`.
    """
    from mrlcache.scoring import speaker_sums

    outer, sums = None, {}
    for pooled, speakers in _iter_cache(cache):
        e = published(pooled).astype(np.float64)  # (n, E)
        outer = e.T @ e if outer is None else outer + e.T @ e
        for name, row, count in zip(*speaker_sums(e, speakers)):
            old = sums.get(name)
            sums[name] = (row, count) if old is None else (old[0] + row, old[1] + count)
    names = sorted(sums)
    try:
        return lda_from_stats(outer, np.stack([sums[n][0] for n in names]), np.array([sums[n][1] for n in names]))
    except (ValueError, TypeError) as err:
        raise EvaluateError(f"{cache.path}: cannot fit LDA: {err}") from None


def cache_stats(cache, transforms: dict) -> dict:
    """Per system, the mean embedding and the per-speaker means (AS-Norm cohort) of a cache.

    Args:
        cache: an opened training cache (every view of every utterance is used);
        transforms: as returned by :func:`transforms`.
    Returns:
        {system: {"mean": (D,) float64, "cohort": (S, D) float64, speakers sorted}}.
    """
    from mrlcache.scoring import speaker_sums

    acc = {name: {"sum": 0.0, "n": 0, "spk": {}} for name in transforms}
    # One pass over the cache for every system: sums, not arrays, so memory stays (S, D).
    for pooled, speakers in _iter_cache(cache):
        for name, fn in transforms.items():
            e = fn(pooled).astype(np.float64)  # (n, D)
            a = acc[name]
            a["sum"] = a["sum"] + e.sum(axis=0)
            a["n"] += e.shape[0]
            names, sums, counts = speaker_sums(e, speakers)
            for s, row, c in zip(names, sums, counts):
                old = a["spk"].get(s)
                a["spk"][s] = (row, c) if old is None else (old[0] + row, old[1] + c)
    if not acc or next(iter(acc.values()))["n"] == 0:
        raise EvaluateError(f"{cache.path}: the cache holds no vectors")
    out = {}
    for name, a in acc.items():
        names = sorted(a["spk"])
        cohort = np.stack([a["spk"][s][0] / a["spk"][s][1] for s in names])  # (S, D)
        out[name] = {"mean": a["sum"] / a["n"], "cohort": cohort}
    return out


def log_durations(data_dir, utts, max_seconds=None) -> dict:
    """{utt: log seconds} from the audio headers under ``data_dir``, capped at ``max_seconds``.

    The duration quality measure of a calibration (``mrlcache calibrate --data``, and
    ``eer --calibration`` through :func:`evaluate`); the cap is the cache's ``max_seconds``.
    """
    import math

    from mrlcache.audio import AudioError, audio_info

    out = {}
    for u in utts:
        try:
            rate, frames, _ = audio_info(audio_path(data_dir, u))
        except AudioError as err:
            raise EvaluateError(f"audio root {data_dir}: {u}: {err}") from None
        if frames is None or frames <= 0:
            raise EvaluateError(f"audio root {data_dir}: {u}: the header gives no duration")
        seconds = frames / rate if max_seconds is None else min(frames / rate, float(max_seconds))
        out[u] = math.log(seconds)
    return out


def normalised_scores(emb, ie, it, dims, *, mean=None, cohort=None, norm="asnorm", topk=300,
                      quality=False) -> tuple[np.ndarray, dict]:
    """Cosine scores of trials at every dim, centred and AS-/S-Normed, and their cohort quality measures.

    Args:
        emb: (U, D) embeddings; ie, it: (T,) enroll/test rows; dims: prefix widths.
        mean: (D,) centering vector or None; cohort: (K, D) cohort or None (no normalisation).
        norm: "asnorm" (top-``topk``) or "snorm" (the whole cohort); quality: also return
            the mean top-k cohort score of each side (``cohort_mu_enroll``/``_test``).
    Returns:
        (scores (len(dims), T), {name: (len(dims), T)}; empty without cohort or quality).
    """
    from mrlcache import scoring

    if norm not in NORMS:
        raise EvaluateError(f"unknown score normalisation {norm!r}: choose from {list(NORMS)}")
    scores = scoring.score_trials(emb, ie, it, dims, mean=mean)  # (n_dims, T)
    if cohort is None:
        return scores, {}
    k = np.shape(cohort)[0] if norm == "snorm" else topk
    if norm == "snorm":
        scores = scoring.snorm(scores, emb, ie, it, cohort, dims, mean=mean)
    else:
        scores = scoring.asnorm(scores, emb, ie, it, cohort, topk, dims, mean=mean)
    if not quality:
        return scores, {}
    mu, _ = scoring.cohort_stats(emb, cohort, dims, k, mean)  # (n_dims, U)
    return scores, {"cohort_mu_enroll": mu[:, ie], "cohort_mu_test": mu[:, it]}


def evaluate(trials: Trials, utts, pooled, transforms: dict, dims, *, center=None, cohort=None,
             topk: int = 300, norm: str = "asnorm", calibration=None, durations=None,
             log=_note) -> list[dict]:
    """Score ``trials`` with every system at every dim; EER and minDCF of each.

    Args:
        trials: the trials to score; utts, pooled: their utterance ids and (U, P) vectors.
        transforms: {system: pooled (n, P) -> embeddings (n, D)}, in table order.
        dims: requested Matryoshka dims (mrl and pca are scored at each that fits; raw and
            published at their own size).
        center / cohort: {system: stats} from :func:`cache_stats`, or None.
        topk: AS-Norm top-k; norm: "asnorm" or "snorm" (with ``cohort``).
        calibration: a :class:`~mrlcache.calibration.Calibration` of the ``mrl`` system
            (checked by the caller against the model and settings), or None.
        durations: {utt: log seconds} (:func:`log_durations`) when the calibration uses them.
        log: callable for a note about dims not scored.
    Returns:
        one dict per (system, dim): system, dim, eer (fraction), threshold, min_dcf_0.01,
        min_dcf_0.05, bytes_per_utterance; calibrated rows also cllr, min_cllr,
        act_dcf_0.01, act_dcf_0.05 (Cllr in bits, DCFs normalised, c_miss = c_fa = 1).
    """
    from mrlcache import metrics

    ie, it = trials.indices({u: i for i, u in enumerate(utts)})  # (T,), (T,)
    results = []
    for system, transform in transforms.items():
        emb = batched(transform, pooled)  # (U, D)
        if system == "fixed":  # one head per dim, each scored whole (no calibration)
            for d, cols in transform.blocks.items():
                if d in dims:
                    mean = None if center is None else center[system]["mean"][cols]
                    coh = None if cohort is None else cohort[system]["cohort"][:, cols]
                    row, _ = normalised_scores(emb[:, cols], ie, it, [d], mean=mean, cohort=coh, norm=norm, topk=topk)
                    results.append(_metric_row(metrics, system, d, row[0], trials.labels))
            continue
        width = emb.shape[1]
        use = [d for d in dims if d <= width] if system in ("mrl", "pca", "lda") else [width]
        if not use:
            log(f"note: {system} has {width} dims, none of {list(dims)} fit; not scored")
            continue
        if system in ("pca", "lda") and len(use) < len(dims):
            over = [d for d in dims if d > width]
            log(f"note: {system} is limited to the published size {width}: dims {over} not scored")
        mean = None if center is None else center[system]["mean"]
        calibrated = calibration is not None and system == "mrl"
        scores, quality = normalised_scores(  # (n_dims, T), {name: (n_dims, T)}
            emb, ie, it, use, mean=mean, cohort=None if cohort is None else cohort[system]["cohort"],
            norm=norm, topk=topk, quality=calibrated)
        if calibrated and durations is not None:
            for side, ids in (("enroll", trials.enroll), ("test", trials.test)):
                quality[f"log_dur_{side}"] = np.broadcast_to([durations[u] for u in ids], scores.shape)
        for i, (d, row) in enumerate(zip(use, scores)):
            result = _metric_row(metrics, system, d, row, trials.labels)
            if calibrated:
                llr = calibration.apply(row, d, {n: q[i] for n, q in quality.items()
                                                 if n in calibration.quality})
                result["cllr"] = metrics.cllr(llr, trials.labels)
                result["min_cllr"] = metrics.min_cllr(llr, trials.labels)
                result.update({f"act_dcf_{p}": metrics.act_dcf(llr, trials.labels, p_target=p) for p in PRIORS})
            results.append(result)
    return results


def _metric_row(metrics, system, d, row, labels) -> dict:
    """The result of one system at one dim: EER, its threshold, minDCF at each prior, bytes."""
    value, threshold, dcfs = metrics.eer_min_dcf(row, labels, PRIORS)  # one sort for all three
    return {"system": system, "dim": int(d), "eer": value, "threshold": threshold,
            **{f"min_dcf_{p}": dcf for p, dcf in zip(PRIORS, dcfs)},
            "bytes_per_utterance": int(d) * BYTES_PER_VALUE}
