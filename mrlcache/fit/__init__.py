"""Fit a head on cached vectors or streams (:func:`fit`) or end to end on audio (:func:`fit_end_to_end`).

Where each concern lives:

- ``config.py``: FitConfig (by component: head, loss, optim, val, run) / EndToEndConfig,
  every option and its check;
- ``data.py``: the cache's features in memory or streamed, per-epoch draws;
- ``stream_data.py``: cached streams (layers, fbank, mfcc, f0, pooled) for a stream model;
- ``validate.py``: held-out speakers, validation trials, the EER that selects the model;
- ``loop.py``: the TrainJob seam, the one training loop and checkpoint layout;
- ``optim.py``: optimiser, parameter groups, schedule;
- ``rundir.py``: the run directory (lock, resume checks, header files, model.pt, summary);
- ``report.py``: curves.png, model summary, gating analysis, the ``mrlcache runs`` table;
- ``cache_mode.py`` / ``stream_mode.py`` / ``end_to_end.py``: each builds a TrainJob
  (cache_mode hands ``--inputs`` other than ``pooled``, or a head reading frames, to
  stream_mode); ``inputs.py``: the features and validation set both cache modes share;
- ``heads.py``: a head (from :data:`mrlcache.models.HEADS`) and its loss from the options;
- ``losses.py`` / ``fused.py``: the Matryoshka margin losses and their kernels;
- the heads, fusions and stream model themselves are inference modules: :mod:`mrlcache.models`.
"""

from mrlcache.fit.config import EndToEndConfig, FitConfig, FitError

__all__ = ["EndToEndConfig", "FitConfig", "FitError", "fit", "fit_end_to_end"]


def __getattr__(name):
    # The two fits import torch: loaded on first use, so the CLI can read the configs
    # (and set the OpenMP policy) before torch starts.
    if name == "fit":
        from mrlcache.fit.cache_mode import fit

        return fit
    if name == "fit_end_to_end":
        from mrlcache.fit.end_to_end import fit_end_to_end

        return fit_end_to_end
    raise AttributeError(f"module 'mrlcache.fit' has no attribute {name!r}")
