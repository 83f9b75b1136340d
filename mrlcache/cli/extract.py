"""``mrlcache extract``: the frozen backbone over a corpus, once, into a feature cache.

The options of the extraction itself are made from :class:`mrlcache.extract.ExtractConfig`
(defaults, choices and ranges written there once); this file adds where the audio and the
backbone come from and how the pass is run (``--threads``, ``--rank``...).
"""

from pathlib import Path

import click

from mrlcache import names
from mrlcache.cli.options import COUNT, WINDOW, WINDOW_HELP, WORKERS, check_device, config_options
from mrlcache.config import config_option, write_resolved
from mrlcache.components import leaves
from mrlcache.extract.config import ExtractConfig

DIR = click.Path(exists=True, file_okay=False)
FILE = click.Path(exists=True, dir_okay=False)
# Option key -> its parameter name, where they differ (the names extract-config.yaml has always held).
KEYS = {"format": "backend", "backbone": "backbone_name"}

# Help texts of the options made from ExtractConfig (by flat key); defaults, choices and
# ranges come from the dataclass (mrlcache.extract.config).
HELP = {
    "backbone": "Frozen encoder [default: told by --weights; redimnet for --variant].",
    "variant": "Published ReDimNet: b0..b6, S, M (downloaded once); with --random-init, a configuration of "
               "--backbone (ecapa-tdnn: c1024, c512; campplus: e192, e512).",
    "weights": "Local weights: a ReDimNet checkpoint, a SpeechBrain ECAPA-TDNN folder (or its "
               "embedding_model.ckpt), a 3D-Speaker CAM++ state dict.",
    "random_init": "Random backbone (and --ptm) from --seed (the ReDimNet saved as OUT/backbone.pt).",
    "train_type": "Published file: ptn, ft_lm, ft_mix.",
    "dataset": "Published file's training data.",
    "ptm": "Pretrained speech model whose 13 hidden states are the layers stream.",
    "ptm_weights": "Local state_dict file of --ptm (instead of the download).",
    "engine": "torch: the reference forward. fused: ReDimNet with BatchNorm folded and channels-last (faster on "
              "CPUs, vectors within 1e-5 of torch's). onnxruntime: the backbone in ONNX on the CPU (pooled "
              "stream, float32). auto: for a pooled-only float32 job on the CPU the engine measured fastest for "
              "the encoder (fused for ReDimNet), else torch. Any but torch is recorded in cache.json.",
    "precision": "auto: bf16/fp16 autocast on CUDA, fp32 on CPU. Mel features stay float32.",
    "views": "Train mode: crops per utterance (view 0 clean).",
    "max_seconds": "Eval mode: cap on each utterance.",
    "window_seconds": WINDOW_HELP,
    "min_seconds": "Shorter utterances are skipped as too_short.",
    "streams": f"What to store, comma-separated: {', '.join(names.STREAMS)} (docs/cache-format.md).",
    "layers_pooled": "Store per-layer mean and std over time instead of layer frames.",
    "shard_size": "Utterances per shard.",
    "batch_size": "Crops per forward pass [default: 8 on CPU, 128 on CUDA].",
    "workers": "Decoding workers [default: on CPU 1 if a core is left beside the model's threads, else 0; up to 8 with CUDA].",
    "device": "auto, cpu, cuda, cuda:N.",
    "eval_batch": "Eval mode: bucket (utterances of exactly equal length in one forward, up to --batch-size; "
                  "nothing padded) or single (one utterance a forward).",
}
KW = {"backbone": {"param": KEYS["backbone"]}, "variant": {"type": str}, "weights": {"type": click.Path(exists=True)},
      "ptm_weights": {"type": FILE}, "window_seconds": {"type": WINDOW}, "streams": {"show_default": True},
      "device": {"show_default": True}, "format": {"param": KEYS["format"]}}

OPTIONS = [
    click.option("--data", type=DIR, help="VoxCeleb-style tree speaker/video/utt.{wav,flac,m4a}."),
    click.option("--list", "list_file", type=FILE,
                 help="Lines 'utt_id path [speaker]', or a Kaldi wav.scp (with utt2spk beside it or --utt2spk)."),
    click.option("--utt2spk", type=FILE, help="Kaldi utt2spk; makes --list a wav.scp."),
    click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory."),
    *config_options(ExtractConfig, HELP, kw=KW, skip=("augment",)),
    click.option("--noise-dir", type=DIR, help="Noise files (e.g. MUSAN); default synthetic coloured noise."),
    click.option("--rir-dir", type=DIR, help="Room impulse responses; default synthetic rooms."),
    click.option("--speed-perturb", is_flag=True,
                 help="Also speed-perturb augmented views (changes the voice; off by default)."),
    click.option("--threads", type=COUNT, default=None, help="Model threads on the CPU [default: torch's]."),
    click.option("--rank", type=WORKERS, default=None, help="This process's rank without torchrun."),
    click.option("--world-size", type=COUNT, default=None, help="Number of processes without torchrun."),
    click.option("--overwrite", is_flag=True, help="Delete an existing cache at --out and start over."),
    click.option("--quiet", is_flag=True, help="No progress bar."),
]


def _with_options(command):
    for option in reversed(OPTIONS):
        command = option(command)
    return command


def _given(ctx, name) -> bool:
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


@click.command()
@config_option
@_with_options
@click.pass_context
def extract(ctx, **params):
    """Run the frozen backbone once over a corpus and cache its pooled vectors.

    Rerunning the same command resumes: finished shards are kept. Under
    `torchrun --nproc-per-node N -m mrlcache extract ...` each process writes its own shards.
    """
    from mrlcache.runtime import passive_openmp, reuse_large_allocations

    passive_openmp()  # before torch: the decoding workers share the cores with the model
    reuse_large_allocations()  # the backbone's activations reuse the heap instead of fresh pages
    check_device(params["device"])
    import torch
    from rich.console import Console

    from mrlcache.augment import AugmentConfig
    from mrlcache.extract.prepare import extract_corpus, refusals

    if params["mode"] == "eval" and _given(ctx, "views") and params["views"] != 1:
        raise click.UsageError("--mode eval embeds each whole utterance once: --views does not apply")
    if params["mode"] == "train" and _given(ctx, "window_seconds"):
        raise click.UsageError("--window-seconds applies to --mode eval (whole utterances); train crops are "
                               "--crop-seconds long")
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    console, out = Console(stderr=True), params["out"]
    noise, rir = (params[k] and str(Path(params[k]).resolve()) for k in ("noise_dir", "rir_dir"))
    try:
        cfg = ExtractConfig.of(**{k: params[KEYS.get(k, k)] for k in leaves(ExtractConfig) if k != "augment"},
                               augment=AugmentConfig(noise_dir=noise, rir_dir=rir, speed=params["speed_perturb"]))
        summary, rank = extract_corpus(cfg, out, data=params["data"], list_file=params["list_file"],
                                       utt2spk=params["utt2spk"], overwrite=params["overwrite"],
                                       progress=not params["quiet"], rank=params["rank"],
                                       world_size=params["world_size"],
                                       say=lambda line: console.print(line, soft_wrap=True, markup=False,
                                                                      highlight=False))
    except refusals() as err:
        raise click.ClickException(str(err))
    if rank == 0:
        ctx.params["views"] = cfg.views.count  # eval mode has one view whatever --views said
        write_resolved(ctx, Path(out) / "extract-config.yaml")
    if summary is None:
        console.print(f"rank {rank}: my shards are done; the summary is written when every rank has finished")
        return
    print_summary(console, summary, cfg.views.count)
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
