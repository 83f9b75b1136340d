"""The features and validation set of a fit on a cache, for both modes (vectors and streams).

:func:`open_features` holds the training rows in memory or streams them, as the memory
budget allows; :func:`heldout_or_external` makes the validation set; :func:`vector_input`
runs a head over one vector stream as a model of ``{stream: batch}``.
"""

from __future__ import annotations

import sys

import numpy as np

from mrlcache import distributed

from mrlcache.fit.data import Features
from mrlcache.fit.memory import model_bytes, plan_features, shuffle_group
from mrlcache.fit.validate import external_valset, heldout_valset, val_batch


def vector_input(head, inputs):
    """A head over one vector stream as a model of {stream: (b, D)} batches."""
    (name,) = inputs
    return lambda batch: head(batch[name])


def open_features(cache, records: dict, labels, cfg, model, loss_fn, embed_of):
    """The training features of ``records`` in memory or streamed, as the budget allows: (Features, MemoryPlan).

    The order of its epochs is the shuffle group of ``--shuffle-gb`` (a setting of the data);
    the budget (:func:`mrlcache.fit.memory.plan_features`) only chooses how rows are read.
    The plan counts the float32 batches and the model with its optimiser state and the
    activations one batch keeps for the backward pass, measured on copies of the model and
    loss as the growth of the saved tensors from a 2-row to a 4-row probe (weights saved by
    a matmul do not grow with the rows, so they are not counted as activations).
    """
    n = min(4, len(cache))
    probe = {name: cache.read(name, view=0, rows=np.arange(n), dtype=np.float32) for name in records}
    per_row = 0
    if n >= 4:
        saved = [_saved_floats(embed_of, model, loss_fn, {k: v[:rows] for k, v in probe.items()}) for rows in (2, 4)]
        per_row = max(0, (saved[1] - saved[0]) // 2)
    group = shuffle_group(cache, records, cfg.run.feature_dtype, cfg.run.shuffle_gb)  # the order: data, not budget
    heldout = int((np.asarray(labels) < 0).sum()) if cfg.val.val_cache is None else 0
    plan = plan_features(cache, records, cfg.run.feature_dtype, cfg.optim.batch_size,
                         model_bytes(model, loss_fn, cfg.optim.batch_size, per_row), cfg.run.memory_gb, group,
                         heldout)
    note = plan.shortfall()
    if note and distributed.is_main():
        print(note, file=sys.stderr)
    return Features(cache, records, labels, cfg.run.feature_dtype, plan.policy, plan.group, plan.pass_rows), plan


def _saved_floats(embed_of, model, loss_fn, probe: dict) -> int:
    """Values autograd saves for the backward pass of one step on ``probe`` (copies; RNG untouched)."""
    import copy

    import torch

    model_copy, loss_copy = copy.deepcopy(model), copy.deepcopy(loss_fn)
    device = next(model.parameters()).device
    batch = {k: torch.from_numpy(v).to(device) for k, v in probe.items()}
    labels = torch.zeros(len(next(iter(probe.values()))), dtype=torch.long, device=device)
    saved = [0]

    def pack(t):
        saved[0] += t.numel()
        return t

    state = torch.get_rng_state()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_copy(embed_of(model_copy)(batch), labels, None)
    except Exception:  # a head that cannot step on a few rows: its activations go uncounted
        saved[0] = 0
    finally:
        torch.set_rng_state(state)
    return saved[0]


def heldout_or_external(cfg, feats, records, labels, speakers, val_names):
    """The validation set: the external cache and trials, or trials among held-out speakers (their rows only)."""
    if cfg.val.val_cache is not None:
        return external_valset(cfg.val.val_cache, cfg.val.val_trials, cfg.head.inputs, train_meta=feats.cache.meta)
    if not val_names:
        return None
    rows = np.flatnonzero(labels < 0)  # held in the features' dtype, as the training rows
    return heldout_valset(feats.rows(rows, 0, feats.dtype), speakers[rows], cfg.val.max_val_trials, cfg.run.seed,
                          f"{len(val_names)} held-out training speakers", batch=val_batch(records), records=records)
