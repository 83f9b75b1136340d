"""The deployable model: frozen ReDimNet backbone + Matryoshka head (any fitted head), saved as one file.

``MRLModel`` maps a waveform to embeddings of every trained size in one backbone pass.
Embeddings are returned *raw* (the prefix of the head output, not L2-normalised): the
scoring side normalises each prefix itself, and a raw prefix keeps the choice of
normalisation (and of score normalisation) to the caller.

``model.pt`` (written by ``mrlcache fit``) holds only tensors and plain containers, and is
read with ``torch.load(weights_only=True)``, so nothing in it can run code::

    {"format": "mrlcache-model", "version": 2,
     "head": {"name": "mrl" | "ecapa" | ..., "args": {...}},  # HEADS[name](**args)
     "streams": None or {"groups", "fusion", "encoder_dim"},  # a StreamModel around the head
     "head_state": {...},
     "backbone": {source, train_type, dataset, sha256,         # the backbone record, as in cache.json
                  "model_config", "state_dict"}                # embedded (default)
              or {source, train_type, dataset, sha256}         # referenced (--no-embed-backbone)
              or None}                                         # head only

``head`` and ``streams`` are the model record (:mod:`mrlcache.models.record`, which also
converts version 1 files: the only place older layouts are read). A model with ``streams``
is a :class:`mrlcache.models.streams.StreamModel` (encoders, fusion, head); ``forward(wave)``
computes its streams with :mod:`mrlcache.streams`, ``project`` takes ``{stream: array}``
from a cache.

The record is :class:`mrlcache.backbone.BackboneRecord` (files written before it had only
``sha256`` beside an embedded backbone; they load the same). A referenced backbone is loaded
with :func:`mrlcache.backbone.load_backbone` and its SHA-256 checked against the stored one,
so a model never runs silently on other weights.

A calibration (``mrlcache calibrate --attach``) lives beside the file as
``MODEL.calibration.json``; :func:`load_model` reads it into ``model.calibration``
(checking the model SHA-256 it records) and :meth:`MRLModel.verify` then gives LLRs and
decisions. Without one, ``verify`` gives the cosine only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mrlcache.models.record import READS, VERSION, build, record_of, upgrade
from mrlcache.streams import POOLED_ONLY, windows
from mrlcache.streams.windows import WINDOW_SECONDS

FORMAT = "mrlcache-model"


class ModelError(Exception):
    """A model file that cannot be used (wrong format, missing or mismatching backbone)."""


NO_CALIBRATION = ("no calibration: a cosine score has no threshold with a meaning; fit one with "
                  "'mrlcache calibrate --model RUN/model.pt --cache TRAIN_EVAL_CACHE --make-trials 20000 "
                  "--out RUN/calibration.json --attach'")


@dataclass
class Verification:
    """One verification trial: cosine score, and with a calibration its LLR and decision.

    llr, threshold (an LLR), accept: None without a calibration (``note`` says why);
    prior / far: the operating point the threshold was set for (one of them is None).
    """

    dim: int
    score: float
    llr: float | None = None
    threshold: float | None = None
    accept: bool | None = None
    prior: float | None = None
    far: float | None = None
    note: str | None = None


class MRLModel(nn.Module):
    """Backbone + Matryoshka head.

    Args:
        backbone: a ReDimNet (``.pooled(wave)`` -> (B, pooled_dim)), or None for a head-only
            model (only :meth:`project` works).
        head: the fitted head (a head of :data:`mrlcache.models.HEADS` on the pooled vector, or a
            :class:`~mrlcache.models.streams.StreamModel`).
        dims: the trained sizes (default ``head.dims``).
        weights_sha256: SHA-256 of the backbone weights file, when the backbone does not carry it.
    """

    def __init__(self, backbone, head, dims=None, weights_sha256: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.dims = tuple(int(d) for d in (dims or head.dims))
        self.on_streams = hasattr(head, "groups")  # a StreamModel (else a head on the pooled vector)
        self.inputs = tuple(head.inputs) if self.on_streams else POOLED_ONLY  # the cached streams it reads
        self._sha = weights_sha256
        self.calibration = None  # a mrlcache.calibration.Calibration, set by load_model
        self.ptm = None  # {name, source, sha256} of the PTM whose layers it was fitted on, set by load_model
        # Whole waveforms longer than this go through the backbone window by window, as in
        # extract (mrlcache.streams.windows); None: one pass.
        self.window_seconds = WINDOW_SECONDS

    @property
    def weights_sha256(self) -> str | None:
        """SHA-256 of the backbone's weights file."""
        own = getattr(self.backbone, "weights_sha256", None)
        return own or self._sha

    @property
    def needs_backbone(self) -> bool:
        """Whether embedding audio needs the backbone (pooled or layers; handcrafted streams do not)."""
        from mrlcache.streams import spec

        return any(spec(s).needs_backbone for s in self.inputs)

    def _dim(self, dim) -> int:
        if dim is None:
            return self.dims[-1]
        if int(dim) not in self.dims:
            raise ValueError(f"dim {dim}: this model was trained for dims {list(self.dims)}")
        return int(dim)

    def _pooled(self, wave: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            raise ModelError("this model was fitted head-only (no backbone): use project() on pooled vectors")
        return windows.pooled(self.backbone, wave, self.window_seconds)

    def _head_on_wave(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, T) -> head output (B, max_dim): the pooled vector, or the streams the head reads,
        computed by the streams registry as extract computes them."""
        if not self.on_streams:
            return self.head(self._pooled(wave))
        from mrlcache import streams

        needs = [s for s in self.inputs if streams.spec(s).needs_backbone]
        if needs and self.backbone is None:
            raise ModelError(f"stream(s) {', '.join(needs)} need the backbone, and this model was saved "
                             "without one: use project() on cached streams")
        batch = {s: streams.compute(s, wave, self.backbone, layers_pooled=self.head.layers_pooled,
                                    window_seconds=self.window_seconds)
                 for s in self.inputs}
        return self.head(batch)

    def _tensor(self, array) -> torch.Tensor:
        param = next(self.head.parameters())
        return torch.as_tensor(np.asarray(array, dtype=np.float32), device=param.device)

    def forward(self, wave, dim: int | None = None):
        """Waveform (B, T) float32 at 16 kHz -> raw embedding prefix (B, dim); default largest dim.

        numpy in -> numpy float32 out (computed without gradients); torch in -> torch out.
        """
        d = self._dim(dim)
        if not isinstance(wave, torch.Tensor):
            with torch.no_grad():
                return self.forward(self._tensor(wave), d).cpu().numpy()
        return self._head_on_wave(wave)[:, :d]

    def embed_all(self, wave) -> dict:
        """Waveform (B, T) -> {dim: (B, dim)} for every trained dim, one backbone pass (numpy or torch)."""
        if not isinstance(wave, torch.Tensor):
            with torch.no_grad():
                return {d: e.cpu().numpy() for d, e in self.embed_all(self._tensor(wave)).items()}
        emb = self._head_on_wave(wave)  # (B, max_dim)
        return {d: emb[:, :d] for d in self.dims}

    def project(self, pooled, dim: int | None = None):
        """Cached pooled vectors (B, pooled_dim) -> raw prefix (B, dim); a stream model takes
        {stream: (B, *shape[, T])} of the streams in ``self.inputs``.

        numpy in -> numpy float32 out (computed without gradients); torch in -> torch out.
        """
        d = self._dim(dim)
        if isinstance(pooled, dict):  # a stream model: {stream: (B, *shape[, T])}
            missing = [s for s in self.inputs if s not in pooled]
            if missing:
                raise ModelError(f"project: this model reads streams {', '.join(self.inputs)}; "
                                 f"missing {', '.join(missing)}")
            if all(isinstance(v, torch.Tensor) for v in pooled.values()):
                return self.head(pooled)[:, :d]
            with torch.no_grad():
                return self.head({s: self._tensor(pooled[s]) for s in self.inputs})[:, :d].cpu().numpy()
        if self.on_streams:
            raise ModelError(f"project: this model reads streams {', '.join(self.inputs)}; "
                             "pass {stream: array} (e.g. from cache.read(stream, view=0))")
        if isinstance(pooled, torch.Tensor):
            return self.head(pooled)[:, :d]
        param = next(self.head.parameters())
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(pooled, dtype=np.float32), device=param.device)
            return self.head(x)[:, :d].cpu().numpy()


    def verify(self, wave_a, wave_b, dim: int | None = None, *, prior: float | None = None,
               far: float | None = None) -> Verification:
        """Score two waveforms (T,) float32 at 16 kHz: cosine, and LLR + decision with a calibration.

        The decision accepts when ``llr >= threshold``: the Bayes threshold for ``prior``
        (default 0.01, c_miss = c_fa = 1) or the threshold of false-accept rate ``far`` on
        the calibration trials. The calibration must use no score normalisation or
        centering (verify has no cohort); log durations are taken from the waves.
        """
        from mrlcache.audio import SAMPLE_RATE
        from mrlcache.calibration import CalibrationError

        d = self._dim(dim)
        if prior is not None and far is not None:
            raise ValueError("give at most one of prior and far")
        emb = [np.asarray(self.forward(np.asarray(w, dtype=np.float32).reshape(1, -1), d), np.float64)[0]
               for w in (wave_a, wave_b)]  # 2 x (d,)
        norms = [np.linalg.norm(e) for e in emb]
        score = float(emb[0] @ emb[1] / (norms[0] * norms[1])) if min(norms) > 0 else 0.0
        cal = self.calibration
        if cal is None:
            return Verification(d, score, note=NO_CALIBRATION)
        info = cal.info
        if info.get("center") or info.get("asnorm") or info.get("snorm"):
            raise CalibrationError("the attached calibration was fitted on centred or normalised scores, which "
                                   "verify cannot make (no cohort); calibrate without --center/--asnorm-cohort/"
                                   "--snorm-cohort for verify")
        cap = (info.get("durations") or {}).get("max_seconds")
        quality = {}
        for side, w in (("enroll", wave_a), ("test", wave_b)):
            seconds = np.asarray(w).size / SAMPLE_RATE
            quality[f"log_dur_{side}"] = np.array([np.log(seconds if cap is None else min(seconds, cap))])
        quality = {n: q for n, q in quality.items() if n in cal.quality}
        llr = float(cal.apply(np.array([score]), d, quality)[0])
        if far is None:
            prior = 0.01 if prior is None else prior
            threshold = cal.threshold(d, p_target=prior)
        else:
            threshold = cal.threshold(d, far=far)
        return Verification(d, score, llr, threshold, llr >= threshold, prior, far)


def save_model(path, head, *, backbone=None, embed_backbone: bool = True,
               backbone_ref=None, ptm: dict | None = None) -> Path:
    """Write ``model.pt`` atomically; returns its path.

    Args:
        head: the fitted head.
        backbone: the backbone the head was fitted on (None: head-only model).
        embed_backbone: store config and weights with the record (True) or only the record.
        backbone_ref: where the backbone comes from, a :class:`~mrlcache.backbone.BackboneRecord`
            (as :func:`~mrlcache.backbone.backbone_for_cache` returns) or a dict of its fields;
            needed when not embedding. Its SHA-256 is the backbone's own.
        ptm: the PTM record of the cache the head was fitted on ({name, source, sha256}),
            so scoring refuses a cache another PTM made.
    """
    from mrlcache.backbone import BackboneRecord, state_sha256
    from mrlcache.backbone.loading import checkpoint_dict
    from mrlcache.runtime import atomic_torch_save

    path = Path(path)
    entry = None
    if backbone is not None:
        sha = backbone.weights_sha256 or state_sha256(backbone)
        if isinstance(backbone_ref, dict):
            backbone_ref = BackboneRecord.from_dict(backbone_ref)
        if not embed_backbone and not (backbone_ref and backbone_ref.source and not backbone_ref.is_random):
            raise ModelError("--no-embed-backbone needs a backbone file or name to refer to; "
                             "this backbone has none (embed it instead)")
        record = (backbone_ref or BackboneRecord(None)).of_model(backbone).with_sha256(sha)
        entry = {**record.to_dict(), **(checkpoint_dict(backbone) if embed_backbone else {})}
    obj = {"format": FORMAT, "version": VERSION, **record_of(head),
           "head_state": {k: v.detach().cpu() for k, v in head.state_dict().items()}, "backbone": entry}
    if ptm:
        obj["ptm"] = {k: str(ptm[k]) for k in ("name", "source", "sha256") if ptm.get(k) is not None}
    atomic_torch_save(obj, path)
    return path


def _head(obj: dict, path):
    """The model of a (current-layout) model file with its weights."""
    from mrlcache.models import HEADS

    name = (obj.get("head") or {}).get("name")
    if name not in HEADS:
        raise ModelError(f"{path}: head {name!r} is not known to this mrlcache (it knows {', '.join(HEADS)}); "
                         "load it with the mrlcache that wrote it")
    try:
        head = build(obj)
        head.load_state_dict(obj["head_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ModelError(f"{path}: cannot rebuild its {name} head ({type(err).__name__}: {err}); "
                         "load it with the mrlcache that wrote it") from None
    return head


def calibration_path(path) -> Path:
    """Where ``calibrate --attach`` puts a model's calibration: RUN/model.pt -> RUN/model.calibration.json."""
    path = Path(path)
    return path.with_name(path.stem + ".calibration.json")


def _attached_calibration(path: Path):
    """The calibration attached to model file ``path``, or None; ModelError if it is for another model."""
    from mrlcache.calibration import Calibration, CalibrationError
    from mrlcache.runtime import sha256_file

    cal_path = calibration_path(path)
    if not cal_path.is_file():
        return None
    try:
        cal = Calibration.from_json(cal_path)
        cal.check(model_sha256=sha256_file(path))
    except CalibrationError as err:
        raise ModelError(f"{cal_path}: {err}; or delete the file") from None
    if cal.info.get("model_sha256") is None:
        raise ModelError(f"{cal_path}: records no model SHA-256, so it cannot be checked against {path.name}; "
                         f"write it again with 'mrlcache calibrate --attach'")
    return cal


def load_model(path, device: str = "cpu", calibration: bool = True) -> MRLModel:
    """Load a ``model.pt`` written by ``mrlcache fit``; returns an MRLModel in eval mode.

    Args:
        calibration: read an attached ``MODEL.calibration.json`` into ``model.calibration``
            (False: leave it None, e.g. to calibrate the model again).
    Raises:
        ModelError: not a model file, unknown version, backbone missing or SHA-256 mismatch,
            or an attached calibration fitted for another model file.
    """
    from mrlcache.backbone import BackboneRecord, CheckpointError, RecordError, UnsafeFileError
    from mrlcache.backbone.loading import build_from_checkpoint, load_plain, load_recorded

    path = Path(path)
    try:
        obj = load_plain(path, path)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except UnsafeFileError as err:
        raise ModelError(str(err)) from None
    except Exception as err:  # torch raises many types for a non-torch file
        raise ModelError(f"{path}: not a model file ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        hint = " (a backbone checkpoint? load it with load_backbone)" if isinstance(obj, dict) and "state_dict" in obj else ""
        raise ModelError(f"{path}: not an mrlcache model file{hint}; expected RUN/model.pt from 'mrlcache fit'")
    if obj.get("version") not in READS:
        raise ModelError(f"{path}: model format version {obj.get('version')} (this mrlcache reads "
                         f"{', '.join(map(str, READS))}); load it with the mrlcache that wrote it")
    head = _head(upgrade(obj), path)
    entry, backbone, sha = obj["backbone"], None, None
    if entry is not None:
        try:
            record = BackboneRecord.from_dict({k: v for k, v in entry.items()
                                               if k not in ("model_config", "state_dict")})
        except RecordError as err:
            raise ModelError(f"{path}: {err}") from None
        sha = record.sha256
        try:
            if "state_dict" in entry:
                backbone = build_from_checkpoint(entry, f"{path} (embedded backbone)")
                backbone.weights_sha256 = sha
            else:
                backbone = load_recorded(record)
                if backbone.weights_sha256 != sha:
                    raise ModelError(
                        f"{path}: backbone {record.source} has SHA-256 {backbone.weights_sha256}, "
                        f"the model was fitted on {sha}; point it at the original weights"
                    )
        except CheckpointError as err:
            raise ModelError(f"{path}: cannot load its backbone: {err}") from None
        if head.pooled_dim is not None and backbone.pooled_dim != head.pooled_dim:
            raise ModelError(f"{path}: backbone pools {backbone.pooled_dim} dims, head expects {head.pooled_dim}")
    model = MRLModel(backbone, head, weights_sha256=sha).to(device).eval()
    model.ptm = obj.get("ptm") if isinstance(obj.get("ptm"), dict) else None  # the PTM of its training cache
    if calibration:
        model.calibration = _attached_calibration(path)
    return model
