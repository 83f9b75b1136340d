"""Fixed-size heads as a baseline of the Matryoshka head (``fit --fixed-baselines``).

A run fitted with ``--fixed-baselines`` holds, beside ``RUN/model.pt``, one head-only
``RUN/fixed/D/model.pt`` per dim D (:mod:`mrlcache.fit.cache_mode`): the head a
``--dims D`` fit gives on the same cache, data order and settings. ``mrlcache eer`` scores
them as the system ``fixed`` (:class:`FixedHeads`); its table's column MRL/fixed is the EER
ratio of the nested prefix to the fixed head per dim (:func:`fixed_ratios`: the Matryoshka
claim is that it stays near 1), and MRL/best the ratio to the best of every other system
scored at that dim, named (:func:`best_baseline_ratios`: fixed, pca, lda, published, raw).

The LDA a user would fit on the published embedding (``eer --baseline lda``) is computed
from sufficient statistics (:func:`lda_from_stats`, streamed over a cache by
:func:`mrlcache.evaluate.fit_lda_cache`) or from vectors in hand (:func:`fit_lda`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def fixed_models(model_path, model) -> dict:
    """The fixed-size heads beside a model file: {dim: MRLModel} from ``RUN/fixed/D/model.pt``.

    Empty when the run has none (a fit without ``--fixed-baselines``). Raises EvaluateError
    for a head that does not fit ``model`` (another pooled size, or not one fixed dim D).
    """
    from mrlcache.trial_vectors import EvaluateError
    from mrlcache.models.model import ModelError, load_model

    out = {}
    for path in sorted((Path(model_path).parent / "fixed").glob("*/model.pt")):
        try:
            head = load_model(path, calibration=False)
        except ModelError as err:
            raise EvaluateError(f"fixed baseline {err}") from None
        if [str(d) for d in head.dims] != [path.parent.name]:
            raise EvaluateError(f"{path}: expected a fixed head of dim {path.parent.name}, found dims "
                                f"{list(head.dims)}; fit the baselines again with --fixed-baselines")
        if head.head.pooled_dim != model.head.pooled_dim:
            raise EvaluateError(f"{path}: pools {head.head.pooled_dim} dims, the model {model.head.pooled_dim}; "
                                "it belongs to another run")
        out[head.dims[0]] = head
    return dict(sorted(out.items()))


def fixed_ratios(results) -> dict:
    """{dim: EER of mrl / EER of fixed} for every dim scored by both (None where fixed has EER 0)."""
    fixed = {r["dim"]: r["eer"] for r in results if r["system"] == "fixed"}
    return {r["dim"]: (r["eer"] / fixed[r["dim"]] if fixed[r["dim"]] > 0 else None)
            for r in results if r["system"] == "mrl" and r["dim"] in fixed}


def best_baseline_ratios(results) -> dict:
    """{dim: (best other system, EER of mrl / its EER)} at every dim ``mrl`` and another system share.

    The best is the lowest EER among the other systems' rows of that dim (``published`` and
    ``raw`` count at their own size); the ratio is None where that EER is 0.
    """
    out = {}
    for r in results:
        if r["system"] != "mrl":
            continue
        others = [o for o in results if o["system"] != "mrl" and o["dim"] == r["dim"]]
        if others:
            best = min(others, key=lambda o: o["eer"])
            out[r["dim"]] = (best["system"], r["eer"] / best["eer"] if best["eer"] > 0 else None)
    return out


class FixedHeads:
    """The ``fixed`` system: every fixed head's embedding side by side, (n, sum of dims)."""

    def __init__(self, models: dict):
        self.models = dict(sorted(models.items()))
        self.blocks = {}  # dim -> its columns in the concatenation
        start = 0
        for d in self.models:
            self.blocks[d] = slice(start, start + d)
            start += d

    def __call__(self, pooled):
        return np.concatenate([m.project(pooled) for m in self.models.values()], axis=1)  # (n, sum dims)


# --------------------------------------------------------------------------------------
# LDA of an embedding: what a user would fit to order (and truncate) the published dims
# --------------------------------------------------------------------------------------

LDA_RIDGE = 1e-9  # within-class scatter += LDA_RIDGE * mean variance * I (a singular Sw stays solvable)


def lda_from_stats(outer: np.ndarray, class_sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LDA from sufficient statistics: (mean (E,), directions (E, E)), by column, most discriminant first.

    Args:
        outer: (E, E) sum over vectors of ``x x^T``; class_sums: (C, E) sum of each class's
            vectors; counts: (C,) vectors per class.
    The directions solve ``Sb v = lambda Sw v`` (between- and within-class scatter, each
    divided by the number of vectors; Sw with a tiny ridge) and are scaled so that
    ``V^T Sw V = I``; past ``C - 1`` the eigenvalues are ~0: those directions are the
    Sw-orthonormal basis of that space ordered by Euclidean norm, smallest first (stable: not
    the solver's arbitrary basis). Each direction's largest coordinate is made positive (signs do not depend on
    the LAPACK build).
    """
    import scipy.linalg

    outer = np.asarray(outer, np.float64)
    class_sums, counts = np.asarray(class_sums, np.float64), np.asarray(counts, np.float64)
    n = counts.sum()
    if len(counts) < 2 or n <= len(counts):
        raise ValueError(f"LDA needs at least 2 classes and more vectors than classes "
                         f"({len(counts)} classes, {int(n)} vectors)")
    mean = class_sums.sum(0) / n
    class_outer = (class_sums / counts[:, None]).T @ class_sums  # sum_c n_c mu_c mu_c^T
    within = (outer - class_outer) / n
    between = class_outer / n - np.outer(mean, mean)
    within = within + LDA_RIDGE * np.trace(within) / len(within) * np.eye(len(within))
    values, vectors = scipy.linalg.eigh(between, within)  # ascending, V^T Sw V = I
    vectors = vectors[:, ::-1]
    ranked = min(len(counts) - 1, len(vectors))  # Sb has rank <= C - 1: past it the eigenvalues are ~0
    if len(vectors) - ranked > 1:
        # Any Sw-orthonormal basis of that null space is an eigenbasis, and the solver's is
        # arbitrary (the order of the summed rows changes it); fix it: the basis whose
        # Euclidean norms are extremal, smallest norm first (the least amplified direction).
        null = vectors[:, ranked:]
        _, turn = np.linalg.eigh(null.T @ null)
        vectors = np.concatenate([vectors[:, :ranked], null @ turn], axis=1)
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    return mean, vectors * signs


def fit_lda(x: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """LDA of vectors ``x`` (n, E) with class ``labels`` (n,): (mean (E,), directions (E, E))."""
    x = np.asarray(x, np.float64)
    _, inverse = np.unique(np.asarray(labels), return_inverse=True)
    class_sums = np.zeros((inverse.max() + 1, x.shape[1]))
    np.add.at(class_sums, inverse, x)
    return lda_from_stats(x.T @ x, class_sums, np.bincount(inverse).astype(np.float64))
