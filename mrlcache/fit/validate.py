"""Validation: verification trials scored at every dim, the EER that selects the model.

Model selection is by EER, never by training loss: the trials are an external validation
cache and trial list (:func:`external_valset`), or all pairs (or a seeded sample) of
utterances of held-out training speakers (:func:`heldout_trials`). :func:`validate`
scores them as ``mrlcache eer`` does (every prefix in one pass); :func:`raw_eer` is the raw-vector
baseline a head must beat.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from mrlcache.fit.config import FitError
from mrlcache.fit.data import batch_slices


@dataclass
class ValSet:
    """Validation inputs {name: (N, ...) array, or a list of N ragged arrays} (a cache's
    streams in its dtype, or waveforms) and trials as index pairs with 0/1 labels."""

    inputs: dict
    enroll: np.ndarray
    test: np.ndarray
    labels: np.ndarray
    source: str
    batch: int = 1024  # rows per embedding pass (small for waveforms)
    speakers: np.ndarray | None = None  # (N,) speaker of each row, when known (gating analysis)
    records: dict | None = None  # {stream: StreamRecord} of cached inputs (raw-vector baseline)


def heldout_trials(speakers: np.ndarray, max_trials: int, seed: int):
    """All pairs among held-out utterances, or a seeded sample of ``max_trials`` distinct pairs.

    Returns (enroll (T,), test (T,), labels (T,) int8).
    """
    n = len(speakers)
    if n * (n - 1) // 2 <= max_trials:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=max_trials * 2)
        j = rng.integers(0, n, size=max_trials * 2)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        pairs = np.unique(lo[lo != hi] * n + hi[lo != hi])[:max_trials]
        i, j = pairs // n, pairs % n
    labels = (speakers[i] == speakers[j]).astype(np.int8)
    return i, j, labels


def _makers(meta: dict) -> dict:
    """What made a cache's vectors: {"backbone": SHA-256, "PTM": SHA-256} (None when absent)."""
    from mrlcache.backbone import BackboneRecord, RecordError

    try:
        record = BackboneRecord.from_meta(meta)
    except RecordError:
        record = None
    ptm = meta.get("ptm") if isinstance(meta.get("ptm"), dict) else {}
    return {"backbone": record.sha256 if record is not None else None, "PTM": ptm.get("sha256")}


def external_valset(val_cache, trials_path, inputs, records: dict | None = None,
                    train_meta: dict | None = None) -> ValSet:
    """Validation inputs (view 0 of the trial utterances only, in the cache's dtype) from a
    cache and a trial list naming its utterances; ``inputs``: the streams the head reads.

    ``train_meta``: the training cache's metadata; a validation cache whose vectors another
    backbone or PTM made is refused (its EERs would select the model on meaningless scores).
    """
    from mrlcache import cache as cache_mod
    from mrlcache.fit.stream_data import input_records
    from mrlcache.trials import read_trials

    vc = cache_mod.open(val_cache) if isinstance(val_cache, (str, os.PathLike)) else val_cache
    if train_meta is not None:
        want, have = _makers(train_meta), _makers(vc.meta)
        for what in want:
            if want[what] != have[what]:
                def show(sha):
                    return f"{sha[:12]}..." if sha else "none"
                raise FitError(f"--val-cache {val_cache}: its vectors come from {what} {show(have[what])}, the "
                               f"training cache's from {show(want[what])}; extract the validation audio with the "
                               f"same {what}")
    trials = read_trials(trials_path)
    index = {u: k for k, u in enumerate(vc.utterances)}
    missing = sorted({u for u in (*trials.enroll, *trials.test) if u not in index})
    if missing:
        why = vc.skipped.get(missing[0], "not in the cache")
        raise FitError(
            f"{trials_path}: {len(missing)} trial utterance(s) have no vector in {val_cache}, "
            f"e.g. {missing[0]} ({why}); extract them or remove those trials"
        )
    enroll = np.array([index[u] for u in trials.enroll], np.int64)
    test = np.array([index[u] for u in trials.test], np.int64)
    used = np.unique(np.concatenate([enroll, test]))
    records = input_records(vc, inputs, f"--val-cache {val_cache}")
    data = {name: vc.read(name, view=0, rows=used, dtype=vc.streams[name].dtype) for name in records}
    return ValSet(data, np.searchsorted(used, enroll), np.searchsorted(used, test),
                  np.asarray(trials.labels, np.int8), f"{trials_path}", batch=val_batch(records),
                  speakers=np.asarray(vc.speakers)[used], records=records)


def val_batch(records: dict) -> int:
    """Rows per validation pass: 1024 vectors, 64 utterances of frames."""
    return 1024 if all(r.kind == "vector" for r in records.values()) else 64


def raw_eer(val: ValSet) -> float:
    """EER of cosine scoring on the raw cached inputs (each stream averaged over time and
    concatenated): the baseline a head must beat."""
    from mrlcache.fit.stream_data import raw_vectors
    from mrlcache.metrics import eer
    from mrlcache.scoring import score_trials

    vectors = raw_vectors(val.inputs, val.records)
    return eer(score_trials(vectors, val.enroll, val.test, [vectors.shape[1]])[0], val.labels)[0]


@torch.no_grad()
def validate(embed_fn, val: ValSet, dims, device) -> dict:
    """EER and minDCF at every dim. ``embed_fn``: {name: (b, ...) float32 on device} -> (b, max_dim)."""
    from mrlcache.metrics import eer, min_dcf
    from mrlcache.scoring import score_trials

    from mrlcache.fit.stream_data import num_rows, take, to_device

    embs = []
    n = num_rows(val.inputs)
    ragged = any(isinstance(v, list) for v in val.inputs.values())
    # Ragged utterances are embedded one at a time (their frames differ in length).
    slices = [slice(i, i + 1) for i in range(n)] if ragged else batch_slices(n, val.batch)
    for sl in slices:
        embs.append(embed_fn(to_device(take(val.inputs, sl), device)).float().cpu())
    # The scoring `mrlcache eer` uses: all prefixes in one pass (float32 products, float64 sums).
    scores = score_trials(torch.cat(embs).numpy(), val.enroll, val.test, list(dims))  # (S, T)
    out = {"eer": {}, "min_dcf": {}}
    for d, s in zip(dims, scores):
        out["eer"][d] = eer(s, val.labels)[0]
        out["min_dcf"][d] = min_dcf(s, val.labels)
    out["mean_eer"] = float(np.mean(list(out["eer"].values())))
    return out


def heldout_valset(inputs: dict, speakers: np.ndarray, max_trials: int, seed: int, source: str,
                   batch: int = 1024, records: dict | None = None) -> ValSet:
    """A ValSet of trials among held-out utterances: inputs {name: (N, ...)} and their speakers (N,)."""
    e, t, lab = heldout_trials(speakers, max_trials, seed)
    if lab.min() == lab.max():
        raise FitError("held-out validation trials are all one class; raise --val-speakers")
    return ValSet(inputs, e, t, lab, source, batch=batch, speakers=np.asarray(speakers), records=records)


def split_speakers(speakers: np.ndarray, val_speakers: int | None, seed: int, where: str):
    """Hold out validation speakers; the others are the training classes.

    Args: speakers (N,) speaker of each utterance; val_speakers: how many to hold out
    (None: 5% of the speakers, 2..200, none below 6 speakers); where: names the data in errors.
    Returns (held-out speaker names sorted, training speaker names sorted, labels (N,) int64
    class index or -1 for held out, the number held out).
    """
    unlabelled = int(np.count_nonzero(speakers == ""))
    if unlabelled:
        raise FitError(f"{where}: {unlabelled} of {len(speakers)} utterances have no speaker; a fit needs "
                       "speaker labels (extract with speaker folders or a list with speakers, or import "
                       "with --utt2spk)")
    names = sorted(set(speakers.tolist()))
    if len(names) < 2:
        raise FitError(f"{where}: {len(names)} speaker(s) ({', '.join(map(repr, names[:1]))}); a speaker "
                       f"classifier needs at least 2: give a cache (or audio) with more speakers")
    n_val = val_speakers
    if n_val is None:
        n_val = min(200, max(2, len(names) // 20)) if len(names) >= 6 else 0
    if n_val and n_val > len(names) - 2:
        raise FitError(f"--val-speakers {n_val}: {where} has only {len(names)} speakers; "
                       f"keep at least 2 for training")
    pick = np.random.default_rng(seed).permutation(len(names))[:n_val]
    val_names = sorted(names[k] for k in pick)
    held = set(val_names)
    train_names = [s for s in names if s not in held]
    cls = {s: k for k, s in enumerate(train_names)}
    labels = np.array([cls.get(s, -1) for s in speakers], np.int64)
    return val_names, train_names, labels, int(n_val)
