"""The features and validation set of a fit on a cache, for both modes (vectors and streams).

:func:`open_features` holds the training rows in memory or streams them, as the memory
budget allows; :func:`heldout_or_external` makes the validation set; :func:`vector_input`
runs a head over one vector stream as a model of ``{stream: batch}``.
"""

from __future__ import annotations

import numpy as np

from mrlcache.fit.data import Features, model_bytes, plan_features
from mrlcache.fit.validate import external_valset, heldout_valset, val_batch


def vector_input(head, inputs):
    """A head over one vector stream as a model of {stream: (b, D)} batches."""
    (name,) = inputs
    return lambda batch: head(batch[name])


def open_features(cache, records: dict, labels, cfg, model, loss_fn, embed_of):
    """The training features of ``records`` in memory or streamed, as the budget allows: (Features, MemoryPlan).

    The plan counts the float32 batches and the model with its optimiser state and the
    activations of one batch (measured on a two-row probe of copies of the model and loss).
    """
    import copy

    import torch

    probe = {name: cache.read(name, view=0, rows=np.arange(min(2, len(cache))), dtype=np.float32)
             for name in records}
    model_copy, loss_copy = copy.deepcopy(model), copy.deepcopy(loss_fn)
    saved = [0]

    def pack(t):
        saved[0] += t.numel()
        return t

    rows = len(next(iter(probe.values())))
    device = next(model.parameters()).device
    batch = {k: torch.from_numpy(v).to(device) for k, v in probe.items()}
    labels_probe = torch.zeros(rows, dtype=torch.long, device=device)
    embed = embed_of(model_copy)  # the model as a function of {stream: batch}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        state = torch.get_rng_state()
        try:
            emb = embed(batch)
            loss_copy(emb, labels_probe, None)
        except Exception:  # a head that cannot run on two rows: count parameters only
            saved[0] = 0
        torch.set_rng_state(state)
    per_row = saved[0] // max(1, rows)
    plan = plan_features(cache, records, cfg.feature_dtype, cfg.batch_size,
                         model_bytes(model, loss_fn, cfg.batch_size, per_row), cfg.memory_gb)
    return Features(cache, records, labels, cfg.feature_dtype, plan.policy, plan.window), plan


def heldout_or_external(cfg, feats, records, labels, speakers, val_names):
    """The validation set: the external cache and trials, or trials among held-out speakers (their rows only)."""
    if cfg.val_cache is not None:
        return external_valset(cfg.val_cache, cfg.val_trials, cfg.inputs)
    if not val_names:
        return None
    rows = np.flatnonzero(labels < 0)  # held in the features' dtype, as the training rows
    return heldout_valset(feats.rows(rows, 0, feats.dtype), speakers[rows], cfg.max_val_trials, cfg.seed,
                          f"{len(val_names)} held-out training speakers", batch=val_batch(records), records=records)
