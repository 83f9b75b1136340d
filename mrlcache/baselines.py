"""Fixed-size heads as a baseline of the Matryoshka head (``fit --fixed-baselines``).

A run fitted with ``--fixed-baselines`` holds, beside ``RUN/model.pt``, one head-only
``RUN/fixed/D/model.pt`` per dim D (:mod:`mrlcache.fit.cache_mode`): the head a
``--dims D`` fit gives on the same cache, data order and settings. ``mrlcache eer`` scores
them as the system ``fixed`` (:class:`FixedHeads`) and reports the EER ratio MRL/fixed per
dim (:func:`fixed_ratios`): the Matryoshka claim is that it stays near 1 at every dim.
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
