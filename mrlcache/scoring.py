"""Cosine scoring of verification trials at every Matryoshka prefix, and AS-Norm.

A Matryoshka embedding of width D is used at a prefix width d <= D by keeping its first d
coordinates and L2-normalising them. Scoring a trial list therefore needs, per trial and
per prefix d, the cosine of the two d-prefixes. Everything here computes all prefixes in
one pass: the prefix squared norms of each utterance are sums of squares over the
segments [0, d1), [d1, d2), ... accumulated along the feature axis, and the per-trial
prefix dot products are the same segment sums of the elementwise product. Sums are
accumulated in float64 (products of the float32 trial vectors are float32), so scores
agree with a separate float64 computation per prefix to about 1e-7. Scoring 550,000
trials of 4,874 256-d embeddings at dims 64/128/192/256 takes about 0.5 s on one CPU core
(``benchmarks/bench_metrics.py``).

AS-Norm (adaptive symmetric score normalisation; Cumani et al., Interspeech 2011;
Matejka et al., Interspeech 2017), as in the WeSpeaker VoxCeleb recipe: each side of a
trial is scored against a cohort (per-speaker mean embeddings of training data); the
mean mu and standard deviation sd of its top-k cohort scores normalise the trial score,

    s' = ((s - mu_enroll) / sd_enroll + (s - mu_test) / sd_test) / 2,

with the cohort and the trial embeddings centred by the same mean vector if one is used.

S-Norm (symmetric normalisation; Kenny, Odyssey 2010, "Bayesian speaker verification with
heavy-tailed priors") is the same formula with mu and sd taken over the *whole* cohort
instead of its top k: :func:`snorm`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ScoringError(ValueError):
    """Embeddings, indices or options that cannot be scored."""


def _check_dims(dims, width: int) -> np.ndarray:
    """Validate prefix widths against an embedding width; return them as an int array."""
    dims = np.asarray(list(dims), dtype=np.int64)
    if dims.size == 0:
        raise ScoringError("no prefix dims given")
    if (dims < 1).any() or (dims > width).any():
        raise ScoringError(f"prefix dims must be in [1, {width}], got {dims.tolist()}")
    if np.unique(dims).size != dims.size:
        raise ScoringError(f"prefix dims must be distinct, got {dims.tolist()}")
    return dims


def _centred(emb, mean) -> np.ndarray:
    """(N, D) float64 copy of ``emb`` minus ``mean`` (D,) if given."""
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ScoringError(f"embeddings must be (N, D), got shape {x.shape}")
    if mean is not None:
        mean = np.asarray(mean, dtype=np.float64)
        if mean.shape != (x.shape[1],):
            raise ScoringError(f"mean must have shape ({x.shape[1]},), got {mean.shape}")
        x = x - mean
    return x


def _prefix_sums(x: np.ndarray, dims: np.ndarray) -> np.ndarray:
    """Sums over each prefix [0, d) of the last axis, for all ``dims`` in one pass.

    x (..., D); dims distinct, any order. Returns (..., len(dims)).
    """
    order = np.argsort(dims, kind="stable")
    ds = dims[order]
    # Segment sums over [0, d1), [d1, d2), ..., then a cumulative sum over the few
    # segments: one pass over the features instead of one per prefix.
    starts = np.concatenate([[0], ds[:-1]])
    seg = np.add.reduceat(x[..., : ds[-1]], starts, axis=-1, dtype=np.float64)
    sums = np.cumsum(seg, axis=-1)
    out = np.empty_like(sums)
    out[..., order] = sums
    return out


def _prefix_norms(x: np.ndarray, dims: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """L2 norm of every prefix of every row: x (N, D) -> (N, len(dims)); zero norm is an error.

    Squares and sums in float64, ``chunk`` rows at a time (each row's sums are the same
    whatever the chunk; no whole float64 copy of a float32 ``x``).
    """
    squares = np.empty((x.shape[0], dims.size), dtype=np.float64)
    for lo in range(0, x.shape[0], chunk):
        part = np.asarray(x[lo : lo + chunk], dtype=np.float64)
        squares[lo : lo + chunk] = _prefix_sums(part * part, dims)
    norms = np.sqrt(squares)
    zero = norms == 0
    if zero.any():
        rows = np.flatnonzero(zero.any(axis=1))
        raise ScoringError(
            f"{rows.size} embedding(s) have an all-zero prefix (first rows {rows[:5].tolist()}); "
            "cosine scoring is undefined for them"
        )
    return norms


def normalize_prefixes(emb, dims, mean=None, dtype=np.float32) -> dict[int, np.ndarray]:
    """L2-normalised prefixes of every embedding.

    Args:
        emb: (N, D) embeddings.
        dims: prefix widths, each in [1, D].
        mean: optional (D,) vector subtracted before taking prefixes.
        dtype: output dtype (computed in float64).
    Returns:
        {d: (N, d) dtype}, each row of unit norm.
    """
    x = _centred(emb, mean)
    dims = _check_dims(dims, x.shape[1])
    norms = _prefix_norms(x, dims)  # (N, n_dims)
    return {int(d): (x[:, :d] / norms[:, i : i + 1]).astype(dtype) for i, d in enumerate(dims)}


def _check_indices(index, n: int, name: str) -> np.ndarray:
    index = np.asarray(index)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise ScoringError(f"{name} must be a 1-D integer array, got {index.dtype} {index.shape}")
    if index.size and (index.min() < 0 or index.max() >= n):
        raise ScoringError(f"{name} has indices outside [0, {n})")
    return index


def score_trials(emb, index_enroll, index_test, dims, mean=None, chunk=4096) -> np.ndarray:
    """Cosine score of every trial at every prefix width, in one batched pass.

    Args:
        emb: (N, D) embeddings of the trial utterances.
        index_enroll, index_test: (T,) integer rows of ``emb`` for each trial's two sides.
        dims: prefix widths, each in [1, D].
        mean: optional (D,) vector subtracted from every embedding first.
        chunk: trials per block; bounds memory at about 3 * chunk * D * 4 bytes (small
            blocks stay in the CPU cache: 4096 is ~2x faster than 65536).
    Returns:
        (len(dims), T) float64 cosine scores, rows in the order of ``dims``.
    """
    emb = np.asarray(emb)
    # Without a mean, float32 at once: the float64 detour of _centred gives back the same
    # float32 numbers, after two whole copies.
    x = emb if mean is None and emb.dtype.kind == "f" and emb.ndim == 2 else _centred(emb, mean)
    dims = _check_dims(dims, x.shape[1])
    ie = _check_indices(index_enroll, x.shape[0], "index_enroll")
    it = _check_indices(index_test, x.shape[0], "index_test")
    if ie.shape != it.shape:
        raise ScoringError(f"{ie.size} enroll indices but {it.size} test indices")
    # Gathered rows and their products are float32 (half the memory traffic, twice the
    # speed); every sum is accumulated in float64, and the norms are those of the same
    # float32 vectors, so a vector scored against itself gives 1 to ~1e-7.
    x = np.ascontiguousarray(x[:, : dims.max()], dtype=np.float32)
    # Norms once per utterance, not per trial: an utterance appears in many trials.
    norms = _prefix_norms(x, dims)  # (N, n_dims), in float64
    out = np.empty((dims.size, ie.size), dtype=np.float64)
    for lo in range(0, ie.size, chunk):
        e, t = ie[lo : lo + chunk], it[lo : lo + chunk]
        dots = _prefix_sums(x[e] * x[t], dims)  # (C, n_dims)
        out[:, lo : lo + chunk] = (dots / (norms[e] * norms[t])).T
    return out


def speaker_sums(emb, speakers: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-speaker sums of embeddings, for means over data read in pieces.

    Args:
        emb: (N, D) embeddings.
        speakers: N speaker labels.
    Returns:
        (names, sums, counts): sorted unique names, (S, D) float64 sums, (S,) int64 counts.
    """
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != len(speakers):
        raise ScoringError(f"embeddings {emb.shape} do not match {len(speakers)} speaker labels")
    names, inverse = np.unique(np.asarray(speakers, dtype=str), return_inverse=True)
    counts = np.bincount(inverse, minlength=names.size)
    # One bincount per feature: linear time, no (N, D) temporary copy.
    sums = np.zeros((names.size, emb.shape[1]))
    for j in range(emb.shape[1]):
        sums[:, j] = np.bincount(inverse, weights=emb[:, j], minlength=names.size)
    return names.tolist(), sums, counts.astype(np.int64)


def speaker_means(emb, speakers: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Mean embedding of each speaker (the AS-Norm cohort of common VoxCeleb recipes).

    The mean is taken of the raw embeddings, so the d-prefix of a speaker mean is the mean
    of the d-prefixes: one cohort serves every prefix width.

    Args:
        emb: (N, D) embeddings.
        speakers: N speaker labels.
    Returns:
        (names, means): sorted unique speaker names and their (S, D) float64 means.
    """
    if np.shape(emb)[0] == 0:
        raise ScoringError("no embeddings to average")
    names, sums, counts = speaker_sums(emb, speakers)
    return names, sums / counts[:, None]


def cohort_stats(emb, cohort, dims, topk, mean=None, chunk=2048) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each embedding's top-k cohort cosine scores, per prefix.

    Args:
        emb: (N, D) embeddings; cohort: (K, D) cohort embeddings (e.g. speaker means).
        dims: prefix widths; topk: number of highest cohort scores kept, 2 <= topk <= K.
        mean: optional (D,) vector subtracted from both before normalising.
    Returns:
        (mu, sd), each (len(dims), N) float64; sd is the population standard deviation.
    """
    cohort = np.asarray(cohort)
    if cohort.ndim != 2 or cohort.shape[1] != np.shape(emb)[1]:
        raise ScoringError(f"cohort must be (K, {np.shape(emb)[1]}), got {cohort.shape}")
    k_all = cohort.shape[0]
    if not 2 <= topk <= k_all:
        raise ScoringError(f"AS-Norm top-k must be in [2, {k_all}] (cohort size), got {topk}")
    # float64 throughout: the top-k std can be small, and dividing by it magnifies error.
    e = normalize_prefixes(emb, dims, mean, dtype=np.float64)
    c = normalize_prefixes(cohort, dims, mean, dtype=np.float64)
    n = np.shape(emb)[0]
    mu = np.empty((len(e), n))
    sd = np.empty((len(e), n))
    for i, d in enumerate(_check_dims(dims, cohort.shape[1])):
        for lo in range(0, n, chunk):
            s = e[int(d)][lo : lo + chunk] @ c[int(d)].T  # (C, K)
            # The k largest, in no particular order: enough for their mean and std.
            top = np.partition(s, k_all - topk, axis=1)[:, k_all - topk :]
            mu[i, lo : lo + chunk] = top.mean(axis=1)
            sd[i, lo : lo + chunk] = top.std(axis=1)
    return mu, sd


def asnorm(scores, emb, index_enroll, index_test, cohort, topk, dims, mean=None) -> np.ndarray:
    """Adaptive symmetric normalisation of trial scores at every prefix width.

    Args:
        scores: (len(dims), T) raw cosine scores from :func:`score_trials`.
        emb, index_enroll, index_test, dims, mean: as given to :func:`score_trials`.
        cohort: (K, D) cohort embeddings; topk: cohort scores kept per side.
    Returns:
        (len(dims), T) normalised scores.
    """
    return _symmetric_norm(scores, emb, index_enroll, index_test, cohort, topk, dims, mean)


def snorm(scores, emb, index_enroll, index_test, cohort, dims, mean=None) -> np.ndarray:
    """Symmetric normalisation (S-Norm) with the full cohort, at every prefix width.

    Args: as :func:`asnorm`, without ``topk`` (every cohort score is used; K >= 2).
    Returns:
        (len(dims), T) normalised scores.
    """
    cohort = np.asarray(cohort)
    if cohort.ndim != 2 or cohort.shape[0] < 2:
        raise ScoringError(f"S-Norm needs a (K, D) cohort with K >= 2, got shape {cohort.shape}")
    return _symmetric_norm(scores, emb, index_enroll, index_test, cohort, cohort.shape[0], dims, mean)


def _symmetric_norm(scores, emb, index_enroll, index_test, cohort, topk, dims, mean) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    ie = _check_indices(index_enroll, np.shape(emb)[0], "index_enroll")
    it = _check_indices(index_test, np.shape(emb)[0], "index_test")
    if scores.shape != (len(list(dims)), ie.size) or ie.shape != it.shape:
        raise ScoringError(
            f"scores {scores.shape} do not match {len(list(dims))} dims x {ie.size} trials"
        )
    # Stats once per utterance (N cohort scorings), then gathered for each trial side.
    mu, sd = cohort_stats(emb, cohort, dims, topk, mean)
    if (sd == 0).any():
        raise ScoringError("an embedding has identical top-k cohort scores (std 0); use a larger top-k")
    return 0.5 * ((scores - mu[:, ie]) / sd[:, ie] + (scores - mu[:, it]) / sd[:, it])
