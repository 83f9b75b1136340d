"""What an extraction reads: the utterances, the models, and this process's rank.

The command line's ``mrlcache extract`` parses options and calls these, then
:func:`mrlcache.extract.extract`; every refusal is an :class:`ExtractError` naming the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from mrlcache.extract.config import ExtractConfig, ExtractError


def dist_env(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, bool]:
    """(rank, world_size, launched_by_torchrun): the arguments, else torchrun's environment, else (0, 1)."""
    env_rank, env_world, torchrun = 0, 1, False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        env_rank, env_world, torchrun = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "MASTER_ADDR" in os.environ
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


def load_weights(variant=None, weights=None, random_init=False, seed=0, train_type="ptn", dataset="vox2"):
    """The ReDimNet backbone and a description of where its weights come from."""
    from mrlcache.backbone.loading import load_backbone

    if random_init:
        if not variant or weights:
            raise ExtractError("--random-init needs --variant NAME (and no --weights)")
        return load_backbone(variant, random_init=True, seed=seed), f"random-init:{variant}:seed={seed}"
    if bool(variant) == bool(weights):
        raise ExtractError("give exactly one of --variant NAME, --weights PATH (or --random-init --variant NAME)")
    if weights:
        return load_backbone(weights), str(Path(weights).resolve())
    return load_backbone(variant, train_type=train_type, dataset=dataset), f"{variant}-{dataset}-{train_type}"


def load_models(cfg: ExtractConfig, variant=None, weights=None, random_init=False, train_type="ptn",
                dataset="vox2"):
    """(ReDimNet or None, its source or None, PTM or None, one line describing them) for ``cfg``."""
    if cfg.ptm and "pooled" in cfg.stream_names and not (variant or weights):
        raise ExtractError(f"--streams {cfg.streams}: pooled is ReDimNet's vector and --ptm {cfg.ptm} has none; "
                           "also give --variant/--weights, or drop pooled")
    ptm = None
    if cfg.ptm:
        from mrlcache.streams import load_ptm

        ptm = load_ptm(cfg.ptm, weights=cfg.ptm_weights, random_init=random_init and not cfg.ptm_weights,
                       seed=cfg.seed)
    model, source = None, None
    if cfg.needs_redimnet or variant or weights:
        model, source = load_weights(variant, weights, random_init, cfg.seed, train_type, dataset)
    described = f"backbone {source} (pooled {model.pooled_dim})" if model is not None else "no ReDimNet"
    if ptm is not None:
        described += f", PTM {cfg.ptm} ({ptm.source})"
    if cfg.stream_names != ("pooled",):
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
