"""``mrlcache extract``: the frozen backbone over a corpus, once, into a feature cache."""

from pathlib import Path

import click

from mrlcache.backbone.registry import backbone_names
from mrlcache.cli.options import CAP, COUNT, SECONDS, SEED, WORKERS, check_device, window_option
from mrlcache.config import config_option, write_resolved
from mrlcache.distributed import env as dist_env


def load_utterances(data, list_file, utt2spk):
    """The manifest from --data (a speaker tree) or --list (an utt list or Kaldi wav.scp)."""
    from mrlcache import corpus

    if bool(data) == bool(list_file):
        raise click.UsageError("give exactly one of --data DIR or --list FILE")
    if data:
        return corpus.scan_tree(data)
    if utt2spk or Path(list_file).name == "wav.scp":
        return corpus.read_kaldi(list_file, utt2spk)  # finds utt2spk beside wav.scp itself
    return corpus.read_list(list_file)


def load_weights(variant, weights, random_init, seed, train_type, dataset, backbone=None):
    """The backbone and a description of where its weights come from.

    ``backbone``: the encoder (registry name); None: told by the weights file, ReDimNet for
    a variant name. With ``random_init``, ``variant`` names one of its configurations.
    """
    from mrlcache.backbone.loading import load_backbone
    from mrlcache.backbone.registry import config_names

    if random_init:
        if not variant or weights:
            names = ", ".join(config_names(backbone or "redimnet"))
            raise click.UsageError(f"--random-init needs --variant NAME ({names}) and no --weights")
        return (load_backbone(variant, backbone=backbone, random_init=True, seed=seed),
                f"random-init:{variant}:seed={seed}")
    if bool(variant) == bool(weights):
        raise click.UsageError("give exactly one of --variant NAME, --weights PATH (or --random-init --variant NAME)")
    if weights:
        return load_backbone(weights, backbone=backbone), str(Path(weights).resolve())
    return (load_backbone(variant, backbone=backbone, train_type=train_type, dataset=dataset),
            f"{variant}-{dataset}-{train_type}")


@click.command()
@config_option
@click.option("--data", type=click.Path(exists=True, file_okay=False), help="VoxCeleb-style tree speaker/video/utt.{wav,flac,m4a}.")
@click.option("--list", "list_file", type=click.Path(exists=True, dir_okay=False), help="Lines 'utt_id path [speaker]', or a Kaldi wav.scp (with utt2spk beside it or --utt2spk).")
@click.option("--utt2spk", type=click.Path(exists=True, dir_okay=False), help="Kaldi utt2spk; makes --list a wav.scp.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory.")
@click.option("--format", "backend", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
@click.option("--backbone", "backbone_name", type=click.Choice(backbone_names()), default=None,
              help="Frozen encoder [default: told by --weights; redimnet for --variant].")
@click.option("--variant", help="Published ReDimNet: b0..b6, S, M (downloaded once); with --random-init, a "
                                "configuration of --backbone (ecapa-tdnn: c1024, c512; campplus: e192, e512).")
@click.option("--train-type", default="ptn", show_default=True, help="Published file: ptn, ft_lm, ft_mix.")
@click.option("--dataset", default="vox2", show_default=True, help="Published file's training data.")
@click.option("--weights", type=click.Path(exists=True), help="Local weights: a ReDimNet checkpoint, a SpeechBrain "
              "ECAPA-TDNN folder (or its embedding_model.ckpt), a 3D-Speaker CAM++ state dict.")
@click.option("--random-init", is_flag=True, help="Random backbone (and --ptm) from --seed (the ReDimNet saved as OUT/backbone.pt).")
@click.option("--mode", type=click.Choice(["train", "eval"]), default="train", show_default=True)
@click.option("--views", type=COUNT, default=4, show_default=True, help="Train mode: crops per utterance (view 0 clean).")
@click.option("--crop-seconds", type=SECONDS, default=2.0, show_default=True)
@click.option("--max-seconds", type=CAP, default=None, help="Eval mode: cap on each utterance.")
@window_option
@click.option("--min-seconds", type=SECONDS, default=0.5, show_default=True, help="Shorter utterances are skipped as too_short.")
@click.option("--noise-dir", type=click.Path(exists=True, file_okay=False), help="Noise files (e.g. MUSAN); default synthetic coloured noise.")
@click.option("--rir-dir", type=click.Path(exists=True, file_okay=False), help="Room impulse responses; default synthetic rooms.")
@click.option("--speed-perturb", is_flag=True, help="Also speed-perturb augmented views (changes the voice; off by default).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--shard-size", type=COUNT, default=1000, show_default=True, help="Utterances per shard.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--batch-size", type=COUNT, default=None, help="Crops per forward pass [default: 8 on CPU, 128 on CUDA].")
@click.option("--workers", type=WORKERS, default=None, help="Decoding workers [default: 1 on CPU, up to 8 with CUDA].")
@click.option("--threads", type=COUNT, default=None, help="Model threads on the CPU [default: torch's].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16/fp16 autocast on CUDA, fp32 on CPU. Mel features stay float32.")
@click.option("--rank", type=click.IntRange(min=0), default=None, help="This process's rank without torchrun.")
@click.option("--world-size", type=COUNT, default=None, help="Number of processes without torchrun.")
@click.option("--streams", default="pooled", show_default=True,
              help="What to store, comma-separated: pooled, layers, fbank, mfcc, f0 (docs/cache-format.md).")
@click.option("--layers-pooled", is_flag=True, help="Store per-layer mean and std over time instead of layer frames.")
@click.option("--ptm", type=click.Choice(["wavlm-base-plus", "hubert-base", "wav2vec2-base"]), default=None,
              help="Pretrained speech model whose 13 hidden states are the layers stream.")
@click.option("--ptm-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local state_dict file of --ptm (instead of the download).")
@click.option("--engine", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="onnxruntime: the backbone exported to ONNX and run by onnxruntime on the CPU (faster "
                   "here; pooled stream, float32; recorded in cache.json).")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache at --out and start over.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def extract(ctx, data, list_file, utt2spk, out, backend, backbone_name, variant, train_type, dataset, weights, random_init, mode,
            views, crop_seconds, max_seconds, window_seconds, min_seconds, noise_dir, rir_dir, speed_perturb, seed, shard_size,
            dtype, batch_size, workers, threads, device, precision, rank, world_size, streams, layers_pooled, ptm,
            ptm_weights, engine, overwrite, quiet):
    """Run the frozen backbone once over a corpus and cache its pooled vectors.

    Rerunning the same command resumes: finished shards are kept. Under
    `torchrun --nproc-per-node N -m mrlcache extract ...` each process writes its own shards.
    """
    from mrlcache.runtime import passive_openmp, reuse_large_allocations

    passive_openmp()  # before torch: the decoding workers share the cores with the model
    reuse_large_allocations()  # the backbone's activations reuse the heap instead of fresh pages
    check_device(device)
    import torch
    from rich.console import Console

    from mrlcache.augment import AugmentConfig, AugmentError
    from mrlcache.cache import CacheError
    from mrlcache.corpus import CorpusError
    from mrlcache.extract import ExtractConfig, ExtractError
    from mrlcache.extract import extract as run_extract
    from mrlcache.backbone.loading import CheckpointError
    from mrlcache.streams import PTMError

    from mrlcache.runtime import DeviceError

    try:
        env_rank, env_world, torchrun = dist_env()
    except DeviceError as err:
        raise click.ClickException(str(err)) from None
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    barrier = None
    if mode == "eval" and ctx.get_parameter_source("views") not in (None, click.core.ParameterSource.DEFAULT) \
            and views != 1:
        raise click.UsageError("--mode eval embeds each whole utterance once: --views does not apply")
    if mode == "train" and ctx.get_parameter_source("window_seconds") not in (None, click.core.ParameterSource.DEFAULT):
        raise click.UsageError("--window-seconds applies to --mode eval (whole utterances); train crops are "
                               "--crop-seconds long")
    try:
        cfg = ExtractConfig(
            mode=mode, views=views, crop_seconds=crop_seconds, max_seconds=max_seconds, window_seconds=window_seconds,
            min_seconds=min_seconds,
            seed=seed, shard_size=shard_size, dtype=dtype, batch_size=batch_size, workers=workers, device=device,
            precision=precision, streams=streams, layers_pooled=layers_pooled, ptm=ptm, ptm_weights=ptm_weights, engine=engine,
            augment=AugmentConfig(noise_dir=noise_dir and str(Path(noise_dir).resolve()),
                                  rir_dir=rir_dir and str(Path(rir_dir).resolve()), speed=speed_perturb),
        )
        if ptm and "pooled" in cfg.stream_names and not (variant or weights):
            raise click.UsageError(f"--streams {streams}: pooled is ReDimNet's vector and --ptm {ptm} has none; "
                                   f"also give --variant/--weights, or drop pooled")
        utterances = load_utterances(data, list_file, utt2spk)
        ptm_model = None
        if ptm:
            from mrlcache.streams import load_ptm

            ptm_model = load_ptm(ptm, weights=ptm_weights, random_init=random_init and not ptm_weights, seed=seed)
        if cfg.needs_redimnet or variant or weights:
            model, source = load_weights(variant, weights, random_init, seed, train_type, dataset, backbone_name)
        else:
            model, source = None, None
        if torchrun and world_size > 1 and overwrite:
            import datetime

            import torch.distributed as dist

            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=1))
            barrier = dist.barrier
        described = f"backbone {source} (pooled {model.pooled_dim})" if model is not None else "no ReDimNet"
        if ptm_model is not None:
            described += f", PTM {ptm} ({ptm_model.source})"
        if cfg.stream_names != ("pooled",):
            described += f", streams {','.join(cfg.stream_names)}"
        console.print(f"extract: {len(utterances)} utterances, {described}, "
                      f"mode {mode}, views {cfg.views}, rank {rank}/{world_size} -> {out}")
        from mrlcache.extract.run import check_layers_source
        from mrlcache.extract.sizes import describe, projected_sizes

        check_layers_source(model, cfg, ptm_model)
        sizes = projected_sizes(utterances, cfg, model, ptm_model)
        console.print(f"projected cache size: {describe(sizes)} (total {sum(sizes.values()) / 1e9:.3g} GB)",
                      soft_wrap=True, markup=False, highlight=False)
        summary = run_extract(
            utterances, model, out, cfg, backend=backend, overwrite=overwrite, rank=rank, world_size=world_size,
            weights_source=source or "", save_backbone=random_init and model is not None, barrier=barrier,
            progress=not quiet, ptm=ptm_model,
        )
    except (ExtractError, CheckpointError, CorpusError, CacheError, AugmentError, PTMError) as err:
        raise click.ClickException(str(err))
    finally:
        if barrier is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        ctx.params["views"] = cfg.views  # eval mode has one view whatever --views said
        write_resolved(ctx, Path(out) / "extract-config.yaml")
    if summary is None:
        console.print(f"rank {rank}: my shards are done; the summary is written when every rank has finished")
        return
    print_summary(console, summary, cfg.views)
    if summary["skipped"]:
        console.print(f"{summary['skipped']} utterances have no vectors: listed with their reason in "
                      f"{Path(out) / 'skipped.tsv'}", soft_wrap=True, markup=False, highlight=False)


def print_summary(console, summary: dict, views: int) -> None:
    """The end-of-run table: utterances, views, hours, skipped by reason, speed, size."""
    from rich.table import Table

    table = Table(title="extract summary", show_header=False)
    table.add_row("utterances", f"{summary['utterances']:,}")
    table.add_row("views per utterance", str(views))
    table.add_row("audio hours", f"{summary['audio_hours']:.2f}")
    skipped = ", ".join(f"{r}: {n}" for r, n in summary["skipped_by_reason"].items()) or "none"
    table.add_row("skipped", f"{summary['skipped']} ({skipped})")
    if summary.get("windowed_files"):
        table.add_row("in windows", f"{len(summary['windowed_files'])} long files (cache.json summary.windowed_files)")
    table.add_row("throughput", f"{summary['utterances_per_second']:.1f} utt/s, "
                                f"{summary['audio_seconds_per_second']:.0f}x real time (last rank)")
    table.add_row("model busy", f"{100 * summary['model_busy_fraction']:.0f}% of wall time")
    table.add_row("cache size", f"{summary['cache_bytes'] / 2**20:.1f} MiB in {summary['shards']} shards")
    for name, size in summary.get("stream_bytes", {}).items():
        table.add_row(f"  {name}", f"{size / 2**20:.1f} MiB")
    console.print(table)
