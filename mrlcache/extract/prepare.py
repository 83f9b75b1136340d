"""What an extraction is given: the utterances, the models, and this process's rank.

The command line's ``mrlcache extract`` parses options and calls :func:`extract_corpus`,
which calls these, then :func:`mrlcache.extract.extract`; every refusal is an
:class:`ExtractError` naming the fix.
"""

from __future__ import annotations

from pathlib import Path

from mrlcache.extract.config import ExtractConfig, ExtractError
from mrlcache.streams import pooled_only


def refusals() -> tuple[type, ...]:
    """The errors of an extraction that are one-line refusals naming the fix (the command prints them)."""
    from mrlcache.augment import AugmentError
    from mrlcache.backbone.loading import CheckpointError
    from mrlcache.cache import CacheError
    from mrlcache.corpus import CorpusError
    from mrlcache.streams import PTMError

    return ExtractError, CheckpointError, CorpusError, CacheError, AugmentError, PTMError


def dist_env(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, bool]:
    """(rank, world_size, launched_by_torchrun): the arguments, else torchrun's environment
    (:func:`mrlcache.distributed.env`; malformed values are an ExtractError), else (0, 1)."""
    from mrlcache.distributed import env
    from mrlcache.runtime import DeviceError

    try:
        env_rank, env_world, torchrun = env()
    except DeviceError as err:
        raise ExtractError(str(err)) from None
    return (env_rank if rank is None else rank), (env_world if world_size is None else world_size), torchrun


def load_utterances(data=None, list_file=None, utt2spk=None):
    """The manifest from ``data`` (a speaker tree) or ``list_file`` (an utt list or a Kaldi wav.scp)."""
    from mrlcache import corpus

    if bool(data) == bool(list_file):
        raise ExtractError("give exactly one of --data DIR or --list FILE")
    if data:
        return corpus.scan_tree(data)
    if utt2spk or Path(list_file).name == "wav.scp":
        return corpus.read_kaldi(list_file, utt2spk)  # finds utt2spk beside wav.scp itself
    return corpus.read_list(list_file)


def load_weights(variant=None, weights=None, random_init=False, seed=0, train_type="ptn", dataset="vox2",
                 backbone=None):
    """The backbone and a description of where its weights come from.

    ``backbone``: the encoder (registry name); None: told by the weights file, ReDimNet for
    a variant name. With ``random_init``, ``variant`` names one of its configurations.
    """
    from mrlcache.backbone.loading import load_backbone
    from mrlcache.backbone.registry import config_names

    if random_init:
        if not variant or weights:
            names = ", ".join(config_names(backbone or "redimnet"))
            raise ExtractError(f"--random-init needs --variant NAME ({names}) and no --weights")
        return (load_backbone(variant, backbone=backbone, random_init=True, seed=seed),
                f"random-init:{variant}:seed={seed}")
    if bool(variant) == bool(weights):
        raise ExtractError("give exactly one of --variant NAME, --weights PATH (or --random-init --variant NAME)")
    if weights:
        return load_backbone(weights, backbone=backbone), str(Path(weights).resolve())
    return (load_backbone(variant, backbone=backbone, train_type=train_type, dataset=dataset),
            f"{variant}-{dataset}-{train_type}")


def check_model_options(cfg: ExtractConfig) -> None:
    """ExtractError when the streams ask for a model the options do not name (checked before
    the corpus is scanned: a VoxCeleb scan takes minutes)."""
    b = cfg.backbone
    if b.ptm and "pooled" in cfg.stream_names and not (b.variant or b.weights):
        raise ExtractError(f"--streams {cfg.storage.streams}: pooled is ReDimNet's vector and --ptm {b.ptm} has "
                           "none; also give --variant/--weights, or drop pooled")


def load_models(cfg: ExtractConfig):
    """(ReDimNet or None, its source or None, PTM or None, one line describing them) for ``cfg``."""
    check_model_options(cfg)
    b, ptm = cfg.backbone, None
    if b.ptm:
        from mrlcache.streams import load_ptm

        ptm = load_ptm(b.ptm, weights=b.ptm_weights, random_init=b.random_init and not b.ptm_weights,
                       seed=cfg.run.seed)
    model, source = None, None
    if cfg.needs_redimnet or b.variant or b.weights:
        model, source = load_weights(b.variant, b.weights, b.random_init, cfg.run.seed, b.train_type, b.dataset,
                                     b.name)
    described = f"backbone {source} (pooled {model.pooled_dim})" if model is not None else "no ReDimNet"
    if ptm is not None:
        described += f", PTM {b.ptm} ({ptm.source})"
    if not pooled_only(cfg.stream_names):
        described += f", streams {','.join(cfg.stream_names)}"
    return model, source, ptm, described


def extract_corpus(cfg: ExtractConfig, out, *, data=None, list_file=None, utt2spk=None, overwrite=False,
                   progress=True, rank=None, world_size=None, say=print):
    """The whole extraction ``mrlcache extract`` runs: the utterances of ``data`` (a speaker
    tree) or ``list_file``, the models of ``cfg.backbone``, this process's rank (arguments,
    else torchrun's), then :func:`mrlcache.extract.extract` into ``out``.

    ``say`` gets the one-line plan and the projected cache size before the pass starts.
    Returns (the cache summary, or None while other ranks still run; this rank).
    """
    from mrlcache.extract.run import check_layers_source, extract
    from mrlcache.extract.sizes import describe, projected_sizes

    rank, world_size, torchrun = dist_env(rank, world_size)
    check_model_options(cfg)
    utterances = load_utterances(data, list_file, utt2spk)
    model, source, ptm, described = load_models(cfg)
    say(f"extract: {len(utterances)} utterances, {described}, mode {cfg.views.mode}, views {cfg.views.count}, "
        f"rank {rank}/{world_size} -> {out}")
    check_layers_source(model, cfg, ptm)
    sizes = projected_sizes(utterances, cfg, model, ptm)
    say(f"projected cache size: {describe(sizes)} (total {sum(sizes.values()) / 1e9:.3g} GB)")
    with overwrite_barrier(torchrun, world_size, overwrite) as barrier:
        summary = extract(utterances, model, out, cfg, overwrite=overwrite, rank=rank, world_size=world_size,
                          weights_source=source or "", save_backbone=cfg.backbone.random_init and model is not None,
                          barrier=barrier, progress=progress, ptm=ptm)
    return summary, rank


class overwrite_barrier:
    """Context manager: a gloo barrier when torchrun starts several ranks with ``--overwrite``
    (rank 0 clears the old cache before the others open it), else None."""

    def __init__(self, torchrun: bool, world_size: int, overwrite: bool):
        self.needed = torchrun and world_size > 1 and overwrite

    def __enter__(self):
        if not self.needed:
            return None
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=1))
        return dist.barrier

    def __exit__(self, *exc):
        if self.needed:
            import torch.distributed as dist

            dist.destroy_process_group()
        return False
