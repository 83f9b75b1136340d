"""Trial scoring with a fitted model, set up once: the verbs behind ``eer``, ``calibrate`` and ``verify``.

A :class:`Scorer` holds everything that turns trial vectors into scores: the model and the
systems to score (``mrl`` and baselines), the centering mean and the AS-Norm/S-Norm cohort
(:class:`ScoreConfig`, statistics read from training caches once), and a calibration
checked against all of these. ``mrlcache eer`` asks it for the metrics of a trial list
(:meth:`Scorer.evaluate`), ``mrlcache calibrate`` for the ``mrl`` scores and their quality
measures (:meth:`Scorer.scores`), made the same way; ``mrlcache verify`` scores pairs of
files with :func:`verify_files`. From Python::

    scorer = Scorer("run/model.pt", ScoreConfig(asnorm_cohort="caches/train"))
    vectors = scorer.trial_vectors(read_trials("veri_test2.txt"), cache="caches/vox1-eval")
    results = scorer.evaluate(vectors)

``ScoreConfig`` imports nothing heavy (the command line reads its fields); the scoring
itself is :mod:`mrlcache.evaluate` and :mod:`mrlcache.scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mrlcache.ranges import COUNT, RangeError, bounded
from mrlcache.streams import pooled_only


@dataclass
class ScoreConfig:
    """How scores are made beside the model: centering and cohort normalisation.

    center: training cache whose mean embedding is subtracted; asnorm_cohort: training
    cache whose per-speaker means are the AS-Norm cohort (top ``asnorm_topk`` scores);
    snorm_cohort: the same for S-Norm (the whole cohort). At most one cohort.
    """

    center: str | None = None
    asnorm_cohort: str | None = None
    asnorm_topk: int = bounded(300, COUNT)
    snorm_cohort: str | None = None

    def __post_init__(self):
        from mrlcache.ranges import check_fields
        from mrlcache.trial_vectors import EvaluateError

        check_fields(self, EvaluateError)
        if self.asnorm_cohort and self.snorm_cohort:
            raise EvaluateError("give at most one of --asnorm-cohort and --snorm-cohort")

    @property
    def cohort(self) -> str | None:
        return self.asnorm_cohort or self.snorm_cohort

    @property
    def norm(self) -> str:
        return "snorm" if self.snorm_cohort else "asnorm"

    def record(self) -> dict:
        """{center, asnorm, snorm} as a calibration file records them (resolved paths)."""
        def resolved(p):
            return p and str(Path(p).resolve())

        return {"center": resolved(self.center),
                "asnorm": self.asnorm_cohort and {"cohort": resolved(self.asnorm_cohort), "topk": self.asnorm_topk},
                "snorm": self.snorm_cohort and {"cohort": resolved(self.snorm_cohort)}}

    def describe(self) -> str:
        """What the table title adds: ", AS-Norm top-300", ", S-Norm" or nothing."""
        return (f", AS-Norm top-{self.asnorm_topk}" if self.asnorm_cohort else "") + \
            (", S-Norm" if self.snorm_cohort else "")


class Scorer:
    """A fitted model's trial scoring: systems, centering, cohort and calibration, set up once.

    Args:
        model_path: RUN/model.pt; model: the loaded model (loaded from ``model_path`` if None).
        config: centering and cohort (:class:`ScoreConfig`).
        dims: dims to score (None: every dim of the model; :func:`mrlcache.dims.select_dims`).
        baselines: systems scored beside ``mrl`` (``raw``, ``published``, ``pca``, ``fixed``);
            ``fixed`` is added whenever the run has fixed-size heads.
        pca_cache: training cache the ``pca`` baseline is fitted on.
        calibration: a calibration.json to check against all of this and apply to ``mrl``.
        durations: whether log durations can be given (``--data``), for the calibration check.
        log: callable for warnings and notes.
    Raises EvaluateError (ModelError from loading, RangeError for dims) naming the option.
    """

    def __init__(self, model_path, config: ScoreConfig | None = None, *, model=None, dims=None, baselines=(),
                 pca_cache=None, calibration=None, durations: bool = False, device: str = "cpu", log=None):
        from mrlcache import evaluate as ev
        from mrlcache.dims import select_dims
        from mrlcache.models.model import load_model

        self.model_path, self.config, self.device = model_path, config or ScoreConfig(), device
        self.log = log or ev._note
        self.model = model if model is not None else load_model(model_path, device=device, calibration=False)
        self.dims = select_dims(dims, self.model.dims)
        self.on_streams = not pooled_only(self.model.inputs)
        fixed = ev.fixed_models(model_path, self.model)
        if "fixed" in baselines and not fixed:
            raise ev.EvaluateError(f"--baseline fixed: {Path(model_path).parent} holds no fixed/D/model.pt; "
                                   "fit it with --fixed-baselines")
        self.systems = ["mrl", *(["fixed"] if fixed else []), *dict.fromkeys(b for b in baselines if b != "fixed")]
        if self.model.backbone is None and "published" in self.systems:
            raise ev.EvaluateError("--baseline published needs the backbone's own head, but this model is head-only")
        for name in ("pca", "lda"):
            if name in self.systems and pca_cache is None:
                raise ev.EvaluateError(f"--baseline {name} needs --pca-cache TRAIN_CACHE to fit the {name.upper()} on")
        cfg = self.config
        if self.on_streams and (len(self.systems) > 1 or cfg.center or cfg.cohort):
            raise ev.EvaluateError(
                f"{model_path} reads streams {', '.join(self.model.inputs)}: --baseline, --center, --asnorm-cohort "
                "and --snorm-cohort work on pooled-vector models only; score it without them")
        self.calibration = self._calibration(calibration, durations) if calibration else None
        pca = self.open(pca_cache, "--pca-cache") if {"pca", "lda"} & set(self.systems) else None
        try:
            self.transforms = ev.transforms(self.model, self.systems, pca_cache=pca, device=device, fixed=fixed)
        except ev.EvaluateError as err:  # only the PCA / LDA fits can fail here
            raise ev.EvaluateError(f"--pca-cache {err}") from None
        if "lda" in self.systems:  # C speakers give C - 1 discriminant directions, the rest are in no order
            ranked = len(set(pca.speakers)) - 1
            over = [d for d in self.dims if d > ranked]
            if over:
                self.log(f"note: --baseline lda: --pca-cache {pca_cache} has {ranked + 1} speakers, so only "
                         f"{ranked} LDA directions are discriminant; at dims {over} the rest come in no meaningful "
                         "order (use a training cache with more speakers)")
        # One pass per distinct cache, shared by the centering and the cohort.
        stats = {p: ev.cache_stats(self.open(p, "cache"), self.transforms)
                 for p in dict.fromkeys(p for p in (cfg.center, cfg.cohort) if p)}
        self.center, self.cohort = stats.get(cfg.center), stats.get(cfg.cohort)

    @property
    def uses_durations(self) -> bool:
        """True when the calibration takes log durations as quality measures."""
        return self.calibration is not None and any(n.startswith("log_dur") for n in self.calibration.quality)

    def open(self, path, what: str):
        """A cache opened for this model (refused if another backbone made it)."""
        from mrlcache.evaluate import open_cache_for

        return open_cache_for(path, self.model, what, log=self.log)

    def _calibration(self, path, durations: bool):
        from mrlcache.calibration import Calibration, CalibrationError
        from mrlcache.evaluate import EvaluateError
        from mrlcache.runtime import sha256_file

        try:
            cal = Calibration.from_json(path)
            cal.check(model_sha256=sha256_file(self.model_path), dims=self.dims, durations=durations,
                      **self.config.record())
        except CalibrationError as err:
            raise EvaluateError(f"--calibration {path}: {err}") from None
        return cal

    def trial_vectors(self, trials, cache=None, data=None, skip_missing: bool = False, max_seconds=None,
                      window_seconds=None):
        """The vectors of the trial utterances, from an eval cache (a path or an opened one) or from
        the audio under ``data``.

        Returns a :class:`mrlcache.trial_vectors.TrialVectors`; sets :attr:`max_seconds` to the
        cap the vectors were made with (the cache's own, for a cache), which the durations follow.
        """
        from mrlcache import evaluate as ev
        from mrlcache.streams.windows import WINDOW_SECONDS

        window_seconds = WINDOW_SECONDS if window_seconds is None else window_seconds
        model = self.model
        self.max_seconds = max_seconds
        if cache is not None:
            opened = cache if hasattr(cache, "meta") else self.open(cache, "cache")
            self.max_seconds = opened.meta.get("max_seconds")  # durations capped as the cache's audio was
            if self.on_streams:
                return ev.embeddings_from_cache(opened, model, trials, skip_missing)
            return ev.pooled_from_cache(opened, trials, skip_missing)
        if self.on_streams and (model.backbone is not None or not model.needs_backbone):
            model.window_seconds = window_seconds  # a model on streams computes them from the wave itself
            return ev.pooled_from_audio(model, data, trials, skip_missing, max_seconds, self.device)
        if model.backbone is None:
            raise ev.EvaluateError("this model was fitted head-only (no backbone): score an eval cache with "
                                   "--cache instead")
        return ev.pooled_from_audio(model.backbone, data, trials, skip_missing, max_seconds, self.device,
                                    window_seconds=window_seconds)

    def _durations(self, data, utterances) -> dict | None:
        from mrlcache import evaluate as ev

        if data is None:
            return None
        try:
            return ev.log_durations(data, utterances, getattr(self, "max_seconds", None))
        except ev.EvaluateError as err:
            raise ev.EvaluateError(f"--data {err}") from None

    def evaluate(self, vectors, data=None) -> list[dict]:
        """EER, minDCF (and, calibrated, Cllr, minCllr, actDCF) of every system at every dim.

        ``data``: the audio root the calibration's log durations are read from.
        """
        from mrlcache import evaluate as ev

        durations = self._durations(data, vectors.utterances) if self.uses_durations else None
        return ev.evaluate(vectors.trials, vectors.utterances, vectors.pooled, self.transforms, self.dims,
                           center=self.center, cohort=self.cohort, topk=self.config.asnorm_topk,
                           norm=self.config.norm, calibration=self.calibration, durations=durations, log=self.log)

    def scores(self, vectors, data=None):
        """The ``mrl`` scores of the trials at every dim and their quality measures, as a calibration takes them.

        Returns (scores (n_dims, T), {name: (n_dims, T) or (T,)}): the cohort score means with
        a cohort; ``log_dur_enroll``/``log_dur_test`` (T,) with ``data``.
        """
        import numpy as np

        from mrlcache import evaluate as ev

        emb = ev.batched(self.transforms["mrl"], vectors.pooled)  # (U, D)
        ie, it = vectors.trials.indices({u: i for i, u in enumerate(vectors.utterances)})  # (T,), (T,)
        scores, quality = ev.normalised_scores(
            emb, ie, it, self.dims, mean=self.center["mrl"]["mean"] if self.center else None,
            cohort=self.cohort["mrl"]["cohort"] if self.cohort else None, norm=self.config.norm,
            topk=self.config.asnorm_topk, quality=True)
        log_dur = self._durations(data, vectors.utterances)
        if log_dur is not None:
            quality["log_dur_enroll"] = np.array([log_dur[u] for u in vectors.trials.enroll])
            quality["log_dur_test"] = np.array([log_dur[u] for u in vectors.trials.test])
        return scores, quality


def read_pairs(path, root=None) -> list[tuple[Path, Path]]:
    """Lines ``a.wav b.wav`` of a pair list (blank lines and ``#`` comments skipped), as paths
    under ``root`` (default: the list's folder). Raises EvaluateError naming the line."""
    from mrlcache.trial_vectors import EvaluateError

    path = Path(path)
    root = Path(root) if root else path.parent
    from mrlcache.runtime import read_text

    try:
        text = read_text(path)  # a regular file only (a FIFO would block)
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluateError(f"--pairs {path}: cannot read it ({err})") from None
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise EvaluateError(f"--pairs {path}:{n}: expected two paths 'a.wav b.wav', got {len(fields)} fields")
        pairs.append((root / fields[0], root / fields[1]))
    if not pairs:
        raise EvaluateError(f"--pairs {path}: no pairs in it (lines 'a.wav b.wav')")
    return pairs


def verify_files(model, pairs, dim: int | None = None, *, prior=None, far=None, name="--model") -> list[dict]:
    """Same speaker or not, for each pair of audio files: cosine, and LLR and decision with a calibration.

    Each file is decoded and checked once, however many pairs it is in; then
    :meth:`mrlcache.models.model.MRLModel.verify` scores each pair. Returns one dict per pair:
    ``a``, ``b`` and the fields of a ``Verification``. Raises EvaluateError naming the file
    or option (``name`` is how the model is called in messages).
    """
    from mrlcache.audio import AudioError, check_wave, load_audio
    from mrlcache.backbone.registry import wave_minimum
    from mrlcache.calibration import CalibrationError
    from mrlcache.trial_vectors import EvaluateError

    if model.backbone is None:
        raise EvaluateError(f"{name} was fitted head-only (no backbone): verify needs a model.pt with its backbone")
    from mrlcache.dims import select_dim

    if dim is not None:
        try:
            select_dim(dim, model.dims)
        except RangeError as err:
            raise EvaluateError(str(err)) from None
    if model.calibration is not None and dim is not None and dim not in model.calibration.dims:
        raise EvaluateError(f"--dim {dim}: the attached calibration covers dims {model.calibration.dims} only")
    waves = {}
    for path in dict.fromkeys(p for pair in pairs for p in pair):
        if not Path(path).is_file():
            raise EvaluateError(f"{path}: no such audio file")
        try:
            waves[path] = load_audio(path)  # (T,)
        except AudioError as err:
            raise EvaluateError(f"{path}: cannot decode it ({err.reason}: {err.detail})") from None
        try:  # as extract skips them: too short for the model's frames, or digital silence
            check_wave(waves[path], path, min_seconds=0.0, minimum=wave_minimum(model.backbone))
        except AudioError as err:
            raise EvaluateError(f"{err}; verify needs a file with speech in it") from None
    results = []
    for a, b in pairs:
        try:
            v = model.verify(waves[a], waves[b], dim, prior=prior, far=far)
        except CalibrationError as err:
            raise EvaluateError(f"{name}: {err}") from None
        results.append({"a": str(a), "b": str(b), **vars(v)})
    return results


__all__ = ["RangeError", "ScoreConfig", "Scorer", "read_pairs", "verify_files"]
