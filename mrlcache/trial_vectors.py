"""The pooled vectors of a trial list's utterances, from an eval cache or from audio.

Every system :mod:`mrlcache.evaluate` scores is a function of these vectors; both sources
give the same scores. A trial utterance without a vector is an error naming it (with the
reason extract recorded), unless ``skip_missing`` scores the other trials and says how
many were left out. Also the errors of scoring (:class:`EvaluateError`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrlcache.streams import POOLED_ONLY, pooled_only
from mrlcache.streams.windows import WINDOW_SECONDS
from mrlcache.trials import Trials


class EvaluateError(ValueError):
    """Inputs that cannot be scored (a wrong cache, too little data); the message names the fix."""


class MissingUtterancesError(EvaluateError):
    """Trial utterances without a vector; ``skip_missing=True`` scores the other trials."""

    def __init__(self, missing: list[str], total: int, where: str, reasons: dict, hint="pass skip_missing=True"):
        self.missing, self.total, self.where, self.reasons = missing, total, where, reasons
        super().__init__(self.describe(hint))

    def describe(self, hint: str) -> str:
        """The one-line error, ending with ``hint`` (how to score the rest anyway)."""
        m = self.missing
        shown = ", ".join(u + (f" ({self.reasons[u]})" if u in self.reasons else "") for u in m[:5])
        return (f"{len(m)} of {self.total} trial utterances are missing from {self.where}: {shown}"
                f"{', ...' if len(m) > 5 else ''}; fix the paths or {hint} to score the rest")


def _note(message: str) -> None:
    """Default ``log``: a line on stderr (warnings and notes, never results)."""
    print(message, file=sys.stderr)


def batch_bounds(n: int, batch: int) -> np.ndarray:
    """Bounds of equal batches of ``n`` rows, at most ``batch`` each: (k + 1,) int64.

    One batch when ``n <= batch``; otherwise every batch has at least ``batch // 2`` rows
    (a matrix product of a few rows may take another kernel and round differently).
    """
    return np.linspace(0, n, max(1, -(-n // batch)) + 1).astype(np.int64)


class CacheRows:
    """Pooled vectors of some rows of a cache, read when used: (U, P) in the cache's dtype.

    Scoring reads them batch by batch (:meth:`batches`), each shard once, so the trial
    vectors are never all in memory at once (145,000 x 2,304 float16 is 668 MB, and fresh
    pages cost seconds of system time); ``np.asarray(rows)`` or an index reads them.
    """

    ndim = 2

    def __init__(self, cache, rows, view: int | None):
        self.cache, self.rows, self.view = cache, np.asarray(rows, dtype=np.int64), view
        self.dtype = cache.dtype
        self.shape = (len(self.rows), cache.dim)

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, rows) -> np.ndarray:
        return self.cache.read("pooled", view=self.view, rows=rows, dtype=self.dtype).reshape(len(rows), self.shape[1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self._read(self.rows).astype(dtype or self.dtype, copy=False)  # (U, P)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            return np.asarray(self)[key]
        rows = self.rows[key]
        x = self._read(np.atleast_1d(rows))
        return x[0] if np.ndim(rows) == 0 else x

    def batches(self, batch: int):
        """Yield (positions (n,), vectors (n, P)) in cache order until every row came once;
        the batch sizes are :func:`batch_bounds`'s."""
        order = np.argsort(self.rows, kind="stable")
        ranked = self.rows[order]  # cache positions, increasing
        starts = np.cumsum([0] + [len(s) for s in self.cache.shards])
        shard_of = np.searchsorted(starts, ranked, side="right") - 1  # (U,), increasing
        first = np.searchsorted(shard_of, np.arange(len(starts)))  # where each shard's rows begin in ranked
        held = {}  # shard -> its rows' vectors; the batches walk the shards in order
        bounds = batch_bounds(len(ranked), batch)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            parts = []
            for k in range(shard_of[lo], shard_of[hi - 1] + 1) if hi > lo else ():
                a, b = first[k], first[k + 1]
                if a == b:  # no trial rows in this shard
                    continue
                if k not in held:
                    held = {k: self.cache.shards[k].read("pooled", self.view, rows=ranked[a:b] - starts[k],
                                                         dtype=self.dtype).reshape(b - a, self.shape[1])}
                parts.append(held[k][max(lo, a) - a:min(hi, b) - a])
            if parts:
                yield order[lo:hi], (parts[0] if len(parts) == 1 else np.concatenate(parts))


@dataclass
class TrialVectors:
    """Pooled vectors of the trial utterances and the trials that can be scored with them.

    utterances: U ids, in order of first appearance in ``trials``; pooled: (U, P), float32
    from audio; from a cache, a :class:`CacheRows` in the cache's own dtype (float16 or
    float32), read and widened batch by batch when scored (:func:`mrlcache.evaluate.batched`;
    ``np.asarray`` reads it all); trials: the scorable trials;
    missing: utterances without a vector (their trials were dropped, ``skipped_trials`` of
    them; both empty unless ``skip_missing``).
    """

    utterances: list[str]
    pooled: np.ndarray | CacheRows
    trials: Trials
    skipped_trials: int = 0
    missing: list[str] = field(default_factory=list)


def open_cache_for(path, model, what: str = "cache", log=_note):
    """Open a cache of pooled vectors for scoring with ``model``; refuse it if another backbone made it.

    Args:
        path: cache directory; model: the :class:`mrlcache.models.model.MRLModel` to score with;
        what: how to name the cache in messages; log: callable for a warning line.
    Returns:
        the opened cache. Raises EvaluateError on other weights or another pooled size.
    """
    from mrlcache import cache as cache_mod
    from mrlcache.backbone import BackboneRecord, RecordError

    try:
        cache = cache_mod.open(path)
        record = BackboneRecord.from_meta(cache.meta)
    except cache_mod.CacheError as err:
        raise EvaluateError(f"{what} {path}: {err}") from None
    except RecordError as err:
        raise EvaluateError(f"{what} {path}/cache.json: {err}; extract the cache again") from None
    want, have = model.weights_sha256, record.sha256 if record is not None else None
    if want is None or have is None:
        log(f"warning: cannot check that {what} {path} matches the model's backbone "
            f"(fingerprint missing: model {want}, cache {have})")
    elif want != have:
        raise EvaluateError(
            f"{what} {path} was extracted with backbone weights {have}, but the model's backbone "
            f"is {want}; extract it again with the model's backbone"
        )
    fitted_on = (getattr(model, "ptm", None) or {}).get("sha256")
    made_by = (cache.meta.get("ptm") or {}).get("sha256") if isinstance(cache.meta.get("ptm"), dict) else None
    if fitted_on and fitted_on != made_by:
        name = (cache.meta.get("ptm") or {}).get("name") if made_by else None
        raise EvaluateError(f"{what} {path} holds layers of {name or 'no PTM'} ({(made_by or 'none')[:12]}), but "
                            f"the model was fitted on {model.ptm.get('name')} ({fitted_on[:12]}); extract it "
                            f"with --ptm {model.ptm.get('name')}")
    inputs = tuple(getattr(model, "inputs", POOLED_ONLY))
    if not pooled_only(inputs):  # a model on streams: the cache must hold every one it reads
        held = getattr(cache, "streams", None) or {"pooled": None}
        missing = [n for n in inputs if n not in held]
        if missing:
            raise EvaluateError(f"{what} {path} has no stream {missing[0]!r} (it holds {', '.join(held)}); "
                                f"the model reads {', '.join(inputs)}: extract it with --streams {','.join(inputs)}")
    elif cache.dim != model.head.pooled_dim:
        raise EvaluateError(f"{what} {path} holds {cache.dim}-d pooled vectors, the model expects "
                            f"{model.head.pooled_dim}")
    return cache


def _drop_missing(trials: Trials, missing: list[str]) -> tuple[Trials, int]:
    """The trials without any missing utterance, and how many were dropped."""
    gone = set(missing)
    keep = np.array([e not in gone and t not in gone for e, t in zip(trials.enroll, trials.test)])
    return trials.select(keep), int((~keep).sum())


def _resolve_missing(trials, missing, where, reasons, skip_missing) -> tuple[Trials, int]:
    if not missing:
        return trials, 0
    if not skip_missing:
        raise MissingUtterancesError(missing, len(trials.utterances), where, reasons)
    if len(set(missing)) == len(trials.utterances):
        raise EvaluateError(f"{where}: none of the {len(trials.utterances)} trial utterances is available "
                            f"(e.g. {missing[0]!r}: {reasons.get(missing[0], 'missing')}); nothing left to score")
    return _drop_missing(trials, missing)


def audio_path(data_dir, utt: str) -> Path:
    """``data_dir / utt`` for a trial id, refusing ids that leave the audio root.

    Raises:
        EvaluateError: an absolute id or one with a '..' component (trial lists name files
            relative to --data; nothing outside it is ever read).
    """
    parts = utt.replace("\\", "/").split("/")
    if utt.startswith(("/", "\\")) or Path(utt).is_absolute() or ".." in parts:
        raise EvaluateError(f"audio root {data_dir}: trial id {utt!r} leaves it (absolute or '..'); "
                            f"trial ids must be paths relative to --data")
    return Path(data_dir) / utt


def pooled_from_cache(cache, trials: Trials, skip_missing: bool = False) -> TrialVectors:
    """Gather the pooled vectors of the trial utterances from an eval-mode cache.

    Args:
        cache: an opened cache (:func:`open_cache_for`); trials: the trial list.
        skip_missing: drop the trials of utterances the cache lacks instead of raising
            :class:`MissingUtterancesError` (reasons from the cache's skipped list).
    Returns:
        :class:`TrialVectors` whose vectors are a :class:`CacheRows` (view 0 of a
        multi-view cache): only the trial rows, in the stored dtype, read when scored.
    """
    if cache.meta.get("mode") == "train":
        raise EvaluateError(
            f"{cache.path} is a train-mode cache (random crops of {cache.meta.get('crop_seconds')} s, "
            f"{cache.num_views} views); score trials on an eval-mode cache of the test audio"
        )
    missing = trials.missing(set(cache.utterances))
    kept, skipped = _resolve_missing(trials, missing, f"cache {cache.path}", cache.skipped, skip_missing)
    utts = kept.utterances
    view = 0 if cache.num_views > 1 else None
    return TrialVectors(utts, CacheRows(cache, cache.index_of(utts), view), kept, skipped, missing)


def embeddings_from_cache(cache, model, trials: Trials, skip_missing: bool = False, batch: int = 64) -> TrialVectors:
    """A stream model's embeddings (U, max_dim) of the trial utterances, from an eval cache's streams.

    The vectors of the returned TrialVectors are embeddings already: score them with
    ``transforms(model)`` (whose ``mrl`` is then the identity). Ragged (eval-mode) frames are
    embedded one utterance at a time.
    """
    if cache.meta.get("mode") == "train":
        raise EvaluateError(f"{cache.path} is a train-mode cache; score trials on an eval-mode cache of the test audio")
    missing = trials.missing(set(cache.utterances))
    kept, skipped = _resolve_missing(trials, missing, f"cache {cache.path}", cache.skipped, skip_missing)
    rows = np.asarray(cache.index_of(kept.utterances))
    data = {s: cache.read(s, view=0, rows=rows) for s in model.inputs}  # (U, ...) or lists of (..., T_i)
    ragged = any(isinstance(v, list) for v in data.values())
    step = 1 if ragged else batch
    parts = []
    for lo in range(0, len(rows), step):
        part = {s: (np.stack(v[lo:lo + step]) if isinstance(v, list) else v[lo:lo + step]) for s, v in data.items()}
        parts.append(model.project(part))
    return TrialVectors(kept.utterances, np.concatenate(parts).astype(np.float32), kept, skipped, missing)


def pooled_from_audio(backbone, data_dir, trials: Trials, skip_missing: bool = False,
                      max_seconds: float | None = None, device="cpu", progress: bool = True,
                      window_seconds: float | None = WINDOW_SECONDS) -> TrialVectors:
    """Decode each trial utterance once (whole, capped at ``max_seconds``) and pool it.

    Args:
        backbone: a ReDimNet (``model.backbone``), or a stream model (an ``MRLModel``,
            whose own ``window_seconds`` applies); data_dir: audio root the trial ids are
            relative to; skip_missing: as :func:`pooled_from_cache` (reasons: the AudioError
            of each unreadable file); progress: a progress bar on stderr;
            window_seconds: a ReDimNet embeds longer files window by window
            (:mod:`mrlcache.streams.windows`), as extract does.
    Returns:
        :class:`TrialVectors` with (U, P) float32 vectors.
    """
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from mrlcache.audio import SAMPLE_RATE, AudioError, check_wave, load_audio
    from mrlcache.backbone.registry import wave_minimum

    if backbone is None:
        raise EvaluateError("scoring audio needs the model's backbone, and this model has none")
    from mrlcache.streams import windows

    minimum = wave_minimum(backbone if hasattr(backbone, "min_samples") else getattr(backbone, "backbone", None))
    if hasattr(backbone, "model_config"):  # a ReDimNet (or the onnxruntime engine's)
        def pool(x):
            return windows.pooled(backbone, x, window_seconds)
    else:
        pool = backbone  # an MRLModel on streams: (1, T) -> (1, dim)
    data_dir = Path(data_dir)
    utts = trials.utterances
    paths = {utt: audio_path(data_dir, utt) for utt in utts}  # every id checked before any decoding
    vectors, reasons = {}, {}
    limit = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("embedding trial audio", total=len(utts))
        for utt in utts:
            path = paths[utt]
            try:
                if not path.is_file():
                    raise AudioError(path, "unreadable", "no such file")
                wave = load_audio(path)[:limit]  # (T,)
                check_wave(wave, path, min_seconds=0.0, minimum=minimum)  # too short or silent: missing, as extract skips it
                with torch.no_grad():
                    x = torch.from_numpy(np.ascontiguousarray(wave))[None].to(device)  # (1, T)
                    vectors[utt] = pool(x)[0].cpu().numpy()  # (P,)
            except AudioError as err:
                reasons[utt] = f"{err.reason}: {err.detail}"
            bar.advance(task)
    missing = [u for u in utts if u not in vectors]
    kept, skipped = _resolve_missing(trials, missing, f"audio root {data_dir}", reasons, skip_missing)
    pooled = np.stack([vectors[u] for u in kept.utterances]).astype(np.float32)  # (U, P)
    return TrialVectors(kept.utterances, pooled, kept, skipped, missing)
