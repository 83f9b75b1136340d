"""Loading and saving backbone checkpoints: ReDimNet's published format, and every encoder's.

A ReDimNet checkpoint is a torch file holding ``{"model_config": dict, "state_dict": dict}``
(extra top-level entries are ignored). The model is built from the file's own
``model_config`` and its ``state_dict`` is loaded strictly: any missing, unexpected or
mis-shaped entry is an error listing them. float16/bfloat16 weights are cast to float32.
Other encoders (:mod:`mrlcache.backbone.registry`) load from their own published files,
the kind told by the file (a SpeechBrain ECAPA-TDNN folder or ``embedding_model.ckpt``, a
3D-Speaker CAM++ state dict), the architecture read from the weights' shapes, loaded as
strictly; mrlcache writes them as ``{"encoder", "model_config", "state_dict"}`` with the
state dict under the published names.

Variant names ("b0".."b6", "S", "M") resolve to the files published by the ReDimNet
authors, downloaded once into the torch hub checkpoint cache
(``torch.hub.get_dir()/checkpoints``, which honours ``TORCH_HOME``).

This module is the one source of a backbone's bytes and SHA-256 (:func:`backbone_bytes`,
:func:`state_sha256`, :func:`save_checkpoint`), and every file is read with
``torch.load(weights_only=True)`` (:func:`load_plain`): a pickle that carries code is
refused before anything in it runs.
"""

import hashlib
import io
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch

from mrlcache.backbone.record import BackboneRecord, RecordError
from mrlcache.backbone.registry import BACKBONES, DEFAULT_BACKBONE, encoder_module
from mrlcache.runtime import atomic_torch_save, check_regular, torch_bytes

URL_TEMPLATE = "https://github.com/IDRnD/ReDimNet/releases/download/latest/{name}-{dataset}-{train_type}.pt"
VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "S", "M")


class CheckpointError(Exception):
    """A checkpoint that cannot be found, downloaded, read or loaded exactly, or is not the
    one a cache was made with."""


class UnsafeFileError(CheckpointError):
    """A file holding Python objects other than tensors and plain containers (possibly code)."""


def load_plain(file, origin):
    """``torch.load(file, weights_only=True)`` on the CPU: tensors and plain containers only.

    Nothing in the file runs: the unpickler refuses any other global before building it.

    Args:
        file: a path or a binary file object; origin: the file's name in messages.
    Raises:
        UnsafeFileError: the file names a class or function (what code-carrying pickles do).
        Anything else torch raises for a truncated, corrupt or foreign file.
    """
    try:
        if isinstance(file, (str, os.PathLike)):
            check_regular(file)  # a FIFO is refused, not waited on
        with torch.sparse.check_sparse_tensor_invariants():  # a crafted sparse tensor fails here, not later
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise
        raise UnsafeFileError(
            f"{origin}: refused: the file holds Python objects other than tensors and plain containers "
            f"(it names {found.group(1)}), which could run code when loaded; mrlcache never loads such files: "
            "use a file written by mrlcache or a published checkpoint, from a source you trust") from None


def checkpoint_url(name, train_type="ptn", dataset="vox2"):
    """URL of a published checkpoint, e.g. .../b2-vox2-ptn.pt."""
    return URL_TEMPLATE.format(name=name, dataset=dataset, train_type=train_type)


def _download(url, path):
    """Fetch `url` into `path` with a progress bar; atomic, so a partial file never looks complete."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, console=Console(stderr=True)) as progress:
                task = progress.add_task(f"downloading {path.name}", total=total)
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    progress.advance(task, len(chunk))
        os.chmod(tmp, 0o644)  # mkstemp makes files private; checkpoints are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_checkpoint(name, train_type="ptn", dataset="vox2"):
    """Path of a published checkpoint in the torch hub cache, downloading it if absent."""
    url = checkpoint_url(name, train_type, dataset)
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if path.is_file():
        return path
    try:
        _download(url, path)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise CheckpointError(
            f"cannot download {url} ({e}); without network, download it elsewhere and pass the local "
            f"file instead: load_backbone('/path/to/{path.name}') or --weights PATH "
            f"(or place it at {path})") from e
    return path


def _read_file(path):
    """(what the torch file holds, SHA-256 of its bytes); CheckpointError if unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e})") from e
    sha = hashlib.sha256(data).hexdigest()
    try:
        ckpt = load_plain(io.BytesIO(data), path)
    except UnsafeFileError:
        raise
    except Exception as e:  # torch raises many types for truncated/corrupt/foreign files
        raise CheckpointError(f"{path}: not a readable torch checkpoint, the file may be corrupt or "
                              f"truncated ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); "
                              "delete it and download it again") from e
    return ckpt, sha


def read_checkpoint(path):
    """Read a published-format ReDimNet checkpoint file (or mrlcache's file of any encoder).

    Returns:
        (checkpoint dict, SHA-256 hex digest of the file bytes).
    Raises:
        CheckpointError: unreadable, corrupt, truncated, or not a {model_config, state_dict} dict.
    """
    ckpt, sha = _read_file(path)
    if not isinstance(ckpt, dict) or not {"model_config", "state_dict"} <= set(ckpt):
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a ReDimNet checkpoint: expected a dict with 'model_config' "
                              f"and 'state_dict', found {found}")
    return ckpt, sha


def _listing(keys, limit=10):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_state(path):
    """A published plain state dict file (ECAPA-TDNN, CAM++) -> (state dict, SHA-256 of the file)."""
    state, sha = _read_file(path)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: not a state dict (found {type(state).__name__})")
    return state, sha


def build_from_checkpoint(ckpt, origin):
    """Build the encoder ckpt names (ReDimNet without ``encoder``) from ckpt['model_config'] and
    load ckpt['state_dict'] strictly (float32).

    Args:
        ckpt: dict with 'model_config' and 'state_dict' (and 'encoder' for other encoders).
        origin: file name (or description) used in error messages.
    """
    config, state = ckpt["model_config"], ckpt["state_dict"]
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{origin}: 'model_config' and 'state_dict' must both be dicts")
    encoder = ckpt.get("encoder", DEFAULT_BACKBONE)
    if encoder == DEFAULT_BACKBONE:
        from mrlcache.backbone.redimnet import ConfigError, ReDimNet  # here: a head-only model never needs it

        try:
            model = ReDimNet(config)
        except ConfigError as e:
            raise CheckpointError(f"{origin}: {e}") from e
        return load_strict(model, state, origin)
    return _build_published(_module(encoder, origin), state, origin, config)


def _build_published(module, state, origin, declared=None):
    """An encoder module's model from its published state dict: config from the shapes, strict load.

    ``declared``: the model_config of a file mrlcache wrote; it must agree with the shapes,
    and gives the keys the shapes do not tell (``module.UNSHAPED``: ECAPA-TDNN's dilations,
    CAM++'s embedding ReLU), which would otherwise silently fall back to the defaults.
    """
    try:
        config, state = module.from_published(state, origin)
        if declared is not None:
            unshaped = getattr(module, "UNSHAPED", ())
            declared, shaped = module.resolve_config(declared), module.resolve_config(config)
            differ = [f"{k} {declared[k]} (weights: {shaped[k]})" for k in shaped
                      if k not in unshaped and declared[k] != shaped[k]]
            if differ:
                raise module.ConfigError("model_config disagrees with the weights' shapes: " + ", ".join(differ))
            config = {**shaped, **{k: declared[k] for k in unshaped}}
        model = module.build(config)
    except module.ConfigError as e:
        raise CheckpointError(f"{origin}: {e}") from None
    return load_strict(model, state, origin, getattr(module, "to_published", None))


def _others():
    """The registry's encoders other than ReDimNet (each with the module interface of the registry)."""
    return [encoder_module(n) for n in BACKBONES if n != DEFAULT_BACKBONE]


def _module(encoder, origin):
    try:
        return encoder_module(encoder)
    except KeyError:
        raise CheckpointError(f"{origin}: unknown encoder {encoder!r}; known: {', '.join(BACKBONES)}") from None


def load_strict(model, state, origin, rename=None):
    """Load ``state`` into ``model`` (float32), refusing any missing, unexpected or mis-shaped entry.

    ``rename``: the model's parameter name -> the file's, so that errors name what the file holds.
    """
    rename = rename or (lambda key: key)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{origin}: state_dict entries that are not tensors: {_listing(bad)}")
    # Published weights may be stored in half precision; the model computes in float32.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    expected = model.state_dict()
    missing = {rename(k) for k in set(expected) - set(state)}
    unexpected = {rename(k) for k in set(state) - set(expected)}
    wrong = [f"{rename(k)} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(keys)}): {_listing(keys)}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{origin}: state_dict does not match its model_config; " + "; ".join(parts))
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{origin}: weights hold NaN or infinite values ({_listing(map(rename, broken))}); "
                              "the file is corrupt: download or train it again")
    model.load_state_dict(state, strict=True)
    return model


def _published(path, backbone):
    """Build and load a file or folder whose kind its content tells. Returns (model, sha256)."""
    path = Path(path)
    weights = path
    if path.is_dir():
        files = [m.weights_file(path) for m in _others() if hasattr(m, "weights_file")]
        files = [f for f in files if f.is_file()]
        if not files:
            raise CheckpointError(f"{path}: a folder with no weights file mrlcache knows (a SpeechBrain "
                                  "ECAPA-TDNN folder holds embedding_model.ckpt and hyperparams.yaml)")
        weights = files[0]
    obj, sha = _read_file(weights)
    if isinstance(obj, dict) and {"model_config", "state_dict"} <= set(obj):
        kind = obj.get("encoder", DEFAULT_BACKBONE)
        _check_kind(kind, backbone, weights)
        return build_from_checkpoint(obj, weights), sha
    kinds = [m for m in _others() if isinstance(obj, dict) and m.recognises(obj)]
    if not kinds:
        found = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{weights}: not a ReDimNet checkpoint (a dict with 'model_config' and 'state_dict') "
                              f"nor the published weights of another encoder "
                              f"({', '.join(m.NAME for m in _others())}); found {found}")
    _check_kind(kinds[0].NAME, backbone, weights)
    return _build_published(kinds[0], obj, weights), sha


def _check_kind(found, wanted, path):
    if wanted is not None and found != wanted:
        raise CheckpointError(f"{path}: holds a {found} checkpoint, not {wanted}; drop --backbone or "
                              f"pass --backbone {found}")


def _resolve(source, train_type, dataset):
    """A variant name or a path -> path of a local checkpoint file."""
    if source in VARIANTS:
        return cached_checkpoint(source, train_type, dataset)
    path = Path(source)
    if path.is_file() or path.is_dir():
        return path
    if path.suffix or os.sep in str(source) or path.exists():
        raise CheckpointError(f"{source}: no such checkpoint file")
    raise CheckpointError(f"unknown ReDimNet variant {source!r}: use one of {', '.join(VARIANTS)} "
                          "or a path to a published-format .pt checkpoint")


def load_backbone(source, *, backbone=None, train_type="ptn", dataset="vox2", device="cpu", random_init=False,
                  seed=0):
    """Load a frozen encoder in eval mode from a checkpoint file or folder, or a published variant name.

    Args:
        source: path to a {model_config, state_dict} file, a SpeechBrain ECAPA-TDNN folder
            or its embedding_model.ckpt, a 3D-Speaker CAM++ state dict; or "b0".."b6", "S", "M";
            with ``random_init``, a configuration name of ``backbone``.
        backbone: the encoder expected (``registry.BACKBONES``); None: told by the file
            (ReDimNet for a variant name or random weights).
        train_type, dataset: pick the published file for a name ("ptn"/"ft_lm"/"ft_mix";
            "vox2", "vb2", "vb2+vox2+cnc"), e.g. b2 -> b2-vox2-ptn.pt.
        device: where to put the model.
        random_init: build the named configuration ("b0".."b6") with random weights instead
            of loading any file (tests, benchmarks); `seed` makes them deterministic without
            touching the caller's global RNG state.
    Returns:
        The encoder (ReDimNet, ECAPATDNN, CAMPPlus) with `.weights_sha256` = SHA-256 of the
        weights file (None for random init).
    Raises:
        CheckpointError: unknown name, missing/corrupt file, failed download, mismatching weights.
    """
    if backbone is not None and backbone not in BACKBONES:
        raise CheckpointError(f"unknown backbone {backbone!r}: use one of {', '.join(BACKBONES)}")
    if random_init:
        from mrlcache.backbone.redimnet import CONFIGS, ReDimNet

        kind = backbone or DEFAULT_BACKBONE
        configs = CONFIGS if kind == DEFAULT_BACKBONE else encoder_module(kind).CONFIGS
        if source not in configs:
            raise CheckpointError(f"random_init needs a variant with a known configuration: a {kind} "
                                  f"configuration name ({', '.join(configs)}), got {source!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ReDimNet(CONFIGS[source]) if kind == DEFAULT_BACKBONE else encoder_module(kind).build(configs[source])
        return model.eval().to(device)
    if source in VARIANTS and backbone not in (None, DEFAULT_BACKBONE):
        raise CheckpointError(f"{source} is a ReDimNet variant; {backbone} weights are loaded from a file "
                              "or folder (--weights PATH)")
    path = _resolve(source, train_type, dataset)
    model, sha = _published(path, backbone)
    model.weights_sha256 = sha
    return model.eval().to(device)


def checkpoint_dict(model) -> dict:
    """``{"model_config", "state_dict"}`` of a ReDimNet, on the CPU: what a published file holds.

    Other encoders add ``"encoder": name`` (first) and store their state dict under the
    published names, so the file loads back here and its weights into the reference code.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    encoder = getattr(model, "encoder", DEFAULT_BACKBONE)
    if encoder == DEFAULT_BACKBONE:
        return {"model_config": model.model_config, "state_dict": state}
    rename = getattr(encoder_module(encoder), "to_published", lambda key: key)
    return {"encoder": encoder, "model_config": model.model_config, "state_dict": {rename(k): v for k, v in state.items()}}


def backbone_bytes(model) -> bytes:
    """The published-format file bytes of ``model``: they depend on its config and weights only."""
    return torch_bytes(checkpoint_dict(model))


def state_sha256(model) -> str:
    """SHA-256 of :func:`backbone_bytes`: what :func:`save_checkpoint` returns, without a file."""
    return hashlib.sha256(backbone_bytes(model)).hexdigest()


def save_checkpoint(model, path) -> str:
    """Write ``model`` in the published format; returns (and sets on the model) the file's SHA-256.

    The bytes are :func:`backbone_bytes` (serialised in memory, so the file name does not
    leak into the archive), and the write is atomic.
    """
    model.weights_sha256 = atomic_torch_save(checkpoint_dict(model), path)
    return model.weights_sha256


def load_recorded(record: BackboneRecord, device="cpu"):
    """The backbone a record names (a variant name, a file or a folder), checked by nothing yet."""
    return load_backbone(record.source, backbone=record.encoder, train_type=record.train_type or "ptn",
                         dataset=record.dataset or "vox2", device=device)


def _loadable(source: str | None) -> bool:
    return bool(source) and (source in VARIANTS or "/" in source or source.endswith(".pt"))


def backbone_for_cache(cache_dir, meta: dict, weights=None):
    """The backbone a cache was extracted with, checked against the SHA-256 it records.

    Looks at ``weights`` (explicit file), then ``CACHE/backbone.pt`` (random-init weights
    saved by extract), then the cache's backbone record (a file path or a published
    variant). Caches of format 1 are read through :func:`~mrlcache.backbone.record.convert_v1_meta`.

    Returns:
        (backbone, :class:`BackboneRecord` of what was loaded, with its SHA-256).
    Raises:
        CheckpointError: nothing to load, or the weights are not the ones the cache was made with.
    """
    try:
        recorded = BackboneRecord.from_meta(meta)
    except RecordError as err:
        raise CheckpointError(f"{cache_dir}/cache.json: {err}; pass --weights PATH") from None
    local = Path(cache_dir) / "backbone.pt" if cache_dir is not None else None
    named = recorded.source if recorded is not None else None
    if weights is not None:
        record = BackboneRecord.file(weights)
    elif local is not None and local.is_file():
        record = BackboneRecord.file(local)
    elif named and not recorded.is_random:
        if not _loadable(named):
            raise CheckpointError(f"{cache_dir}: cannot read the backbone source {named!r}; pass --weights PATH")
        record = recorded
    else:
        raise CheckpointError(
            f"{cache_dir}: the cache names no backbone weights it can be loaded from "
            f"(backbone source {named or 'missing'}, no backbone.pt); pass --weights PATH to the "
            f"backbone it was extracted with, or --head-only"
        )
    try:
        backbone = load_recorded(record)
    except CheckpointError as err:
        raise CheckpointError(f"backbone for {cache_dir}: {err}") from None
    want = recorded.sha256 if recorded is not None else None
    if want is None:
        raise CheckpointError(f"{cache_dir}/cache.json records no backbone SHA-256: cannot check the backbone "
                              f"{record.source}")
    if backbone.weights_sha256 != want:
        raise CheckpointError(
            f"backbone {record.source} has SHA-256 {backbone.weights_sha256} but the cache {cache_dir} was "
            f"extracted with {want}; pass --weights with the original file"
        )
    held = int(meta.get("pooled_dim", backbone.pooled_dim))
    if held and held != backbone.pooled_dim:  # 0: no pooled stream (e.g. --streams layers alone)
        raise CheckpointError(f"backbone {record.source} pools {backbone.pooled_dim} dims, the cache holds "
                              f"{meta['pooled_dim']}")
    return backbone, record.of_model(backbone)
