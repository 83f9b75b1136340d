"""What an extraction is given: the utterances, the models, and this process's rank.

The command line's ``mrlcache extract`` parses options and calls these, then
:func:`mrlcache.extract.extract`; every refusal is an :class:`ExtractError` naming the fix.
"""

from __future__ import annotations

from pathlib import Path

from mrlcache.extract.config import ExtractConfig, ExtractError
from mrlcache.streams import pooled_only


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


def check_model_options(cfg: ExtractConfig, variant=None, weights=None) -> None:
    """ExtractError when the streams ask for a model the options do not name (checked before
    the corpus is scanned: a VoxCeleb scan takes minutes)."""
    if cfg.ptm and "pooled" in cfg.stream_names and not (variant or weights):
        raise ExtractError(f"--streams {cfg.streams}: pooled is ReDimNet's vector and --ptm {cfg.ptm} has none; "
                           "also give --variant/--weights, or drop pooled")


def load_models(cfg: ExtractConfig, variant=None, weights=None, random_init=False, train_type="ptn",
                dataset="vox2", backbone=None):
    """(ReDimNet or None, its source or None, PTM or None, one line describing them) for ``cfg``."""
    check_model_options(cfg, variant, weights)
    ptm = None
    if cfg.ptm:
        from mrlcache.streams import load_ptm

        ptm = load_ptm(cfg.ptm, weights=cfg.ptm_weights, random_init=random_init and not cfg.ptm_weights,
                       seed=cfg.seed)
    model, source = None, None
    if cfg.needs_redimnet or variant or weights:
        model, source = load_weights(variant, weights, random_init, cfg.seed, train_type, dataset, backbone)
    described = f"backbone {source} (pooled {model.pooled_dim})" if model is not None else "no ReDimNet"
    if ptm is not None:
        described += f", PTM {cfg.ptm} ({ptm.source})"
    if not pooled_only(cfg.stream_names):
        described += f", streams {','.join(cfg.stream_names)}"
    return model, source, ptm, described


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
