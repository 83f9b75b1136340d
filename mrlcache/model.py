"""The deployable model: frozen ReDimNet backbone + Matryoshka head, saved as one file.

``MRLModel`` maps a waveform to embeddings of every trained size in one backbone pass.
Embeddings are returned *raw* (the prefix of the head output, not L2-normalised): the
scoring side normalises each prefix itself, and a raw prefix keeps the choice of
normalisation (and of score normalisation) to the caller.

``model.pt`` (written by ``mrlcache fit``) is a plain dict::

    {"format": "mrlcache-model", "version": 1, "dims": [...], "pooled_dim": int,
     "head_state": {...},
     "backbone": {"model_config", "state_dict", "sha256"}       # embedded (default)
              or {"source", "train_type", "dataset", "sha256"}  # referenced (--no-embed-backbone)
              or None}                                          # head only

A referenced backbone is loaded with :func:`mrlcache.models.loading.load_backbone` and its
SHA-256 checked against the stored one, so a model never runs silently on other weights.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mrlcache.fit.heads import MatryoshkaHead

FORMAT = "mrlcache-model"
VERSION = 1


class ModelError(Exception):
    """A model file that cannot be used (wrong format, missing or mismatching backbone)."""


class MRLModel(nn.Module):
    """Backbone + Matryoshka head.

    Args:
        backbone: a ReDimNet (``.pooled(wave)`` -> (B, pooled_dim)), or None for a head-only
            model (only :meth:`project` works).
        head: the fitted :class:`~mrlcache.head.MatryoshkaHead`.
        dims: the trained sizes (default ``head.dims``).
        weights_sha256: SHA-256 of the backbone weights file, when the backbone does not carry it.
    """

    def __init__(self, backbone, head: MatryoshkaHead, dims=None, weights_sha256: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.dims = tuple(int(d) for d in (dims or head.dims))
        self._sha = weights_sha256

    @property
    def weights_sha256(self) -> str | None:
        """SHA-256 of the backbone's weights file."""
        own = getattr(self.backbone, "weights_sha256", None)
        return own or self._sha

    def _dim(self, dim) -> int:
        if dim is None:
            return self.dims[-1]
        if int(dim) not in self.dims:
            raise ValueError(f"dim {dim}: this model was trained for dims {list(self.dims)}")
        return int(dim)

    def _pooled(self, wave: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            raise ModelError("this model was fitted head-only (no backbone): use project() on pooled vectors")
        return self.backbone.pooled(wave)

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
        return self.head(self._pooled(wave))[:, :d]

    def embed_all(self, wave) -> dict:
        """Waveform (B, T) -> {dim: (B, dim)} for every trained dim, one backbone pass (numpy or torch)."""
        if not isinstance(wave, torch.Tensor):
            with torch.no_grad():
                return {d: e.cpu().numpy() for d, e in self.embed_all(self._tensor(wave)).items()}
        emb = self.head(self._pooled(wave))  # (B, max_dim)
        return {d: emb[:, :d] for d in self.dims}

    def project(self, pooled, dim: int | None = None):
        """Cached pooled vectors (B, pooled_dim) -> raw prefix (B, dim).

        numpy in -> numpy float32 out (computed without gradients); torch in -> torch out.
        """
        d = self._dim(dim)
        if isinstance(pooled, torch.Tensor):
            return self.head(pooled)[:, :d]
        param = next(self.head.parameters())
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(pooled, dtype=np.float32), device=param.device)
            return self.head(x)[:, :d].cpu().numpy()


def state_sha256(backbone) -> str:
    """SHA-256 of a backbone serialised in the published format (as save_checkpoint writes it)."""
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    torch.save({"model_config": backbone.model_config, "state_dict": state}, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def save_model(path, head: MatryoshkaHead, *, backbone=None, embed_backbone: bool = True,
               backbone_ref: dict | None = None) -> Path:
    """Write ``model.pt`` atomically; returns its path.

    Args:
        head: the fitted head.
        backbone: the backbone the head was fitted on (None: head-only model).
        embed_backbone: store config and weights (True) or only ``backbone_ref`` + SHA-256.
        backbone_ref: {"source", "train_type", "dataset"} for load_backbone (needed when not
            embedding).
    """
    path = Path(path)
    entry = None
    if backbone is not None:
        sha = backbone.weights_sha256 or state_sha256(backbone)
        if embed_backbone:
            entry = {"model_config": backbone.model_config, "sha256": sha,
                     "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()}}
        else:
            if not backbone_ref:
                raise ModelError("--no-embed-backbone needs a backbone file or name to refer to; "
                                 "this backbone has none (embed it instead)")
            entry = {**backbone_ref, "sha256": sha}
    obj = {"format": FORMAT, "version": VERSION, "dims": list(head.dims), "pooled_dim": head.pooled_dim,
           "head_state": {k: v.detach().cpu() for k, v in head.state_dict().items()}, "backbone": entry}
    atomic_save(obj, path)
    return path


def atomic_save(obj, path) -> None:
    """``torch.save`` aside, then rename: a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_model(path, device: str = "cpu") -> MRLModel:
    """Load a ``model.pt`` written by ``mrlcache fit``; returns an MRLModel in eval mode.

    Raises:
        ModelError: not a model file, unknown version, backbone missing or SHA-256 mismatch.
    """
    from mrlcache.models.loading import CheckpointError, build_from_checkpoint, load_backbone

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except Exception as err:  # torch raises many types for a non-torch file
        raise ModelError(f"{path}: not a model file ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        hint = " (a backbone checkpoint? load it with load_backbone)" if isinstance(obj, dict) and "state_dict" in obj else ""
        raise ModelError(f"{path}: not an mrlcache model file{hint}; expected RUN/model.pt from 'mrlcache fit'")
    if obj.get("version") != VERSION:
        raise ModelError(f"{path}: model format version {obj.get('version')} (this mrlcache reads {VERSION})")
    head = MatryoshkaHead(obj["pooled_dim"], obj["dims"])
    head.load_state_dict(obj["head_state"])
    entry, backbone, sha = obj["backbone"], None, None
    if entry is not None:
        sha = entry["sha256"]
        try:
            if "state_dict" in entry:
                backbone = build_from_checkpoint(entry, f"{path} (embedded backbone)")
                backbone.weights_sha256 = sha
            else:
                backbone = load_backbone(entry["source"], train_type=entry.get("train_type", "ptn"),
                                         dataset=entry.get("dataset", "vox2"))
                if backbone.weights_sha256 != sha:
                    raise ModelError(
                        f"{path}: backbone {entry['source']} has SHA-256 {backbone.weights_sha256}, "
                        f"the model was fitted on {sha}; point it at the original weights"
                    )
        except CheckpointError as err:
            raise ModelError(f"{path}: cannot load its backbone: {err}") from None
        if backbone.pooled_dim != head.pooled_dim:
            raise ModelError(f"{path}: backbone pools {backbone.pooled_dim} dims, head expects {head.pooled_dim}")
    return MRLModel(backbone, head, obj["dims"], weights_sha256=sha).to(device).eval()


def backbone_for_cache(cache_dir, meta: dict, weights=None):
    """The backbone a cache was extracted with, checked against its ``weights_sha256``.

    Looks at ``weights`` (explicit file), then ``CACHE/backbone.pt`` (random-init weights),
    then the cache's ``weights_source`` (a file path, or ``{variant}-{dataset}-{train_type}``
    for published weights, as ``mrlcache extract`` records them). Returns (backbone, reference dict for
    :func:`save_model`).

    Raises:
        ModelError: nothing to load, or the weights are not the ones the cache was made with.
    """
    from mrlcache.models.loading import CheckpointError, load_backbone

    local = Path(cache_dir) / "backbone.pt" if cache_dir is not None else None
    recorded = str(meta.get("weights_source") or "")
    train_type, dataset = "ptn", "vox2"
    if weights is not None:
        source = str(Path(weights).resolve())
    elif local is not None and local.is_file():
        source = str(local.resolve())  # random-init weights saved by extract
    elif recorded and Path(recorded).is_file():
        source = recorded
    elif recorded and not recorded.startswith("random-init"):
        # Published weights are recorded as "{variant}-{dataset}-{train_type}", e.g. b2-vox2-ptn.
        source, _, rest = recorded.partition("-")
        dataset, _, train_type = rest.rpartition("-")
        if not (dataset and train_type):
            raise ModelError(f"{cache_dir}: cannot read weights_source {recorded!r}; pass --weights PATH")
    else:
        raise ModelError(
            f"{cache_dir}: the cache names no backbone weights it can be loaded from "
            f"(weights_source {recorded or 'missing'}, no backbone.pt); pass --weights PATH to the "
            f"backbone it was extracted with, or --head-only"
        )
    try:
        backbone = load_backbone(source, train_type=train_type, dataset=dataset)
    except CheckpointError as err:
        raise ModelError(f"backbone for {cache_dir}: {err}") from None
    want = meta.get("weights_sha256")
    if want is None:
        raise ModelError(f"{cache_dir}/cache.json has no weights_sha256: cannot check the backbone {source}")
    if backbone.weights_sha256 != want:
        raise ModelError(
            f"backbone {source} has SHA-256 {backbone.weights_sha256} but the cache {cache_dir} was "
            f"extracted with {want}; pass --weights with the original file"
        )
    if int(meta.get("pooled_dim", backbone.pooled_dim)) != backbone.pooled_dim:
        raise ModelError(f"backbone {source} pools {backbone.pooled_dim} dims, the cache holds {meta['pooled_dim']}")
    return backbone, {"source": source, "train_type": train_type, "dataset": dataset}
