"""``mrlcache fit``: the Matryoshka head on a feature cache (or end to end on audio).

The options are made from the config dataclasses (:mod:`mrlcache.fit.config`), their
groups walked by :func:`mrlcache.cli.options.config_options`: names, defaults, ranges and
choices are written there once, and this file adds help texts and the few options that
belong to the command line only (``--cache``, ``--out``, ``--threads``...).
"""

import dataclasses
from pathlib import Path

import click

from mrlcache.cli.options import COUNT, config_options, verify_option
from mrlcache.config import CommaList, config_option
from mrlcache.fit.config import EndToEndConfig, FitConfig

# Flags that switch off a dataclass option that is on by default: flag -> field.
INVERTED = {"no_embed_backbone": "embed_backbone", "quiet": "progress"}
# Options that only make sense in one mode (refused in the other, never silently ignored).
CACHE_ONLY = ("feature_dtype", "memory_gb", "shuffle_gb", "head_only")
AUGMENT = ("noise_dir", "rir_dir", "speed_perturb")  # -> mrlcache.augment.AugmentConfig
E2E_ONLY = tuple(f.name for f in dataclasses.fields(EndToEndConfig) if f.name != "augment") + AUGMENT


DIR = click.Path(exists=True, file_okay=False)

# Help texts of the options made from FitConfig (by flat key); defaults, choices and ranges
# come from the dataclass (mrlcache.fit.config), and a field without a text here still has its option.
HELP = {
    "dims": "Nested sizes, increasing; '256' alone: a fixed-size head.",
    "head": "Head, by name (mrlcache.names.HEADS): mrl (BN + linear over a pooled input; frames are mean+std "
            "pooled first) or ecapa (ECAPA-TDNN over frames).",
    "inputs": "Cached streams the head reads, e.g. pooled | layers | fbank,f0 | layers,fbank,f0.",
    "fusion": "How several encoders join: concat | cross-attention | gating (needed when --inputs make more "
              "than one encoder).",
    "encoder_dim": "Width of the layer / handcrafted encoders and the fusion.",
    "ecapa_channels": "--head ecapa: block width.",
    "ecapa_scale": "--head ecapa: Res2 groups (divides --ecapa-channels).",
    "ecapa_mfa_channels": "--head ecapa: width after multi-layer aggregation.",
    "ecapa_bottleneck": "--head ecapa: hidden width of SE and attentive pooling.",
    "init": "Start of the head: auto (published on imported vectors and on caches of trained encoder weights, "
            "for --head mrl on pooled without --head-only; else random), random, or published (the encoder's "
            "own embedding layer, rotated so prefixes are ordered; epoch 0 is scored, and a later epoch kept "
            "only if no dim is worse and it is clearly better).",
    "init_rotation": "What orders the published dims at the start (of the training cache's published "
                     "embeddings): pca or lda (rotations: full-size scores unchanged), whitened (exactly eer's "
                     "lda baseline at every dim), or auto (those and the centred pca scored on the validation "
                     "trials at epoch 0; one kept, no worse at the published size than the published embedding).",
    "init_center": "Start from the published embedding minus its training mean (as eer's pca baseline scores "
                   "it), not as it is (then the full-size scores at epoch 0 are exactly the published ones). "
                   "Measured: centring can hurt a lot (benchmarks/README.md).",
    "objective": "margin (a head trained by the margin loss), adaptor (an orthogonal rotation (+ residual MLP) "
                 "of the published embedding trained to keep its similarities at every prefix; no labels) or "
                 "adaptor-supervised (adaptor + the margin loss).",
    "adaptor_hidden": "Residual MLP width of the adaptor; 0: rotation only (full-size scores are exactly the "
                      "published ones).",
    "adaptor_topk": "Nearest neighbours per vector in the adaptor's top-k similarity term.",
    "margin": "AAM margin (radians) after warm-up.",
    "margins": "One AAM margin per dim, e.g. 0.1,0.15,0.2,0.2 (replaces --margin; warmed up alike).",
    "class_sample": "Share of the classes in each step's softmax: the batch's own plus random others "
                    "(Partial FC); 1: all.",
    "dim_weights": "Loss weight per dim, e.g. 1,1,1,1 [default: equal].",
    "grad_scaling": "Scale each embedding coordinate's gradient by 1/(number of dims holding it).",
    "momentum": "SGD only.",
    "warmup_epochs": "Linear lr warm-up (cosine).",
    "grad_clip": "Max gradient norm; 0: off.",
    "val_cache": "Validation cache (view 0 is used).",
    "val_trials": "Trial list naming --val-cache utterances.",
    "val_speakers": "Without --val-cache: held-out training speakers [default: 5%, 2..200]; 0: none.",
    "max_val_trials": "Held-out validation: at most this many trials (a seeded sample).",
    "patience": "Stop after this many epochs without a better mean EER; 0: never.",
    "min_delta": "For --patience: a mean EER counts as better when lower by more than this (a fraction, "
                 "e.g. 0.001).",
    "precision": "bf16: CPU autocast, class-score matmuls in bf16 (float32 softmax); slower than fp32 without "
                 "AMX. CUDA always uses fp16 AMP.",
    "memory_gb": "Memory the fit process may hold (all of it: torch, model, batches, features); features "
                 "beyond it are streamed from disk in passes. It never changes the result "
                 "[default: half the free memory].",
    "shuffle_gb": "Rows shuffled together each epoch: a cache whose features (every view, --feature-dtype) fit "
                  "this is one group, one permutation of all its rows; a larger one is shuffled in groups of "
                  "shards of this size. The order depends on --seed and this, never on --memory-gb.",
    "fixed_baselines": "Also fit one fixed-size head per dim (RUN/fixed/D), same data and settings; "
                       "'mrlcache eer' scores them as the system 'fixed'.",
    "no_embed_backbone": "model.pt refers to the backbone by name/path + SHA-256 instead of holding it.",
    "weights": "Backbone file or model folder (when the cache does not carry it; end to end: the backbone).",
    "head_only": "model.pt without any backbone (vectors of unknown origin).",
    "quiet": "No progress display.",
    "dist_timeout": "Under torchrun: seconds a rank waits for the others (rank 0 validating, a lost rank) "
                    "before the fit stops with a message.",
    # end to end (EndToEndConfig)
    "data": "VoxCeleb-style audio tree.",
    "variant": "published ReDimNet name (b0..b6, S, M).",
    "random_init": "--variant with random weights from --seed.",
    "min_seconds": "shorter files are left out (listed in OUT/skipped.tsv), as in extract.",
    "views": "views per utterance, as extract.",
    "workers": "decoding workers.",
    "unfreeze_after": "train the backbone from this epoch.",
}
KW = {"inputs": {"type": CommaList()}, "val_cache": {"type": DIR},
      "val_trials": {"type": click.Path(exists=True, dir_okay=False)}, "weights": {"type": click.Path(exists=True)},
      "data": {"type": DIR}, "variant": {"type": str}}

OPTIONS = [
    click.option("--cache", type=click.Path(file_okay=False), help="Feature cache from 'mrlcache extract'."),
    click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory."),
    *config_options(FitConfig, HELP, INVERTED, KW),
    click.option("--threads", type=COUNT, default=None, help="Torch CPU threads [default: torch's]."),
    click.option("--resume", is_flag=True, help="Continue the fit in --out from last.pt."),
    click.option("--end-to-end", is_flag=True, help="Train on audio with the backbone run on the fly."),
    *config_options(EndToEndConfig, HELP, kw=KW, prefix="End to end: ", skip=("augment",)),
    click.option("--noise-dir", type=DIR),
    click.option("--rir-dir", type=DIR),
    click.option("--speed-perturb", is_flag=True),
]


def _with_options(command):
    for opt in reversed(OPTIONS):
        command = opt(command)
    return command


def _given(ctx, names) -> list[str]:
    default = (None, click.core.ParameterSource.DEFAULT)
    return [f"--{n.replace('_', '-')}" for n in names if ctx.get_parameter_source(n) not in default]


@click.command()
@config_option
@verify_option
@_with_options
@click.pass_context
def fit(ctx, **params):
    """Fit a Matryoshka head on cached vectors or streams (minutes), selected by EER.

    Default: the mrl head on the pooled vectors. --inputs layers,fbank,f0 --fusion gating
    --head ecapa: encoders per stream, a fusion and ECAPA-TDNN, on a cache extracted with
    those --streams. Writes OUT/{config.yaml, fingerprint.json, history.jsonl, tensorboard/,
    last.pt, best.pt, model.pt, summary.json, curves.png, model_summary.{json,txt}}; a
    gating fit also OUT/gating.{json,png}; end to end also OUT/skipped.tsv (audio files left
    out, with the reason). Load the result with mrlcache.load_model(OUT/model.pt); compare
    runs with 'mrlcache runs'.
    """
    end_to_end = params.pop("end_to_end")
    from mrlcache.runtime import passive_openmp

    # Before torch, for every fit: decoding workers (end to end) or the reading thread
    # (streamed features) share the cores, and on a busy machine busy-waiting threads ran a
    # cache fit 6.5x slower (benchmarks/README.md, "Streamed fits").
    passive_openmp()
    import torch

    from mrlcache.cache import CacheError
    from mrlcache.fit import FitError, fit_end_to_end
    from mrlcache.fit import fit as run_fit
    from mrlcache.models.model import ModelError
    from mrlcache.backbone import CheckpointError
    from mrlcache.trials import TrialsError

    out, resume, threads = (params.pop(k) for k in ("out", "resume", "threads"))
    if threads:
        torch.set_num_threads(threads)
    for flag, field in INVERTED.items():
        params[field] = not params.pop(flag)
    params["inputs"] = tuple(s.strip() for s in params["inputs"].split(",") if s.strip())
    dims = params.pop("dims")
    try:
        source = _for_mode(ctx, params, end_to_end)
        run = (fit_end_to_end if end_to_end else run_fit)(source, dims, out, resume=resume, **params)
    except (FitError, ModelError, CacheError, CheckpointError, TrialsError) as err:
        raise click.ClickException(str(err))
    from mrlcache.distributed import env

    if env()[0] == 0:  # under torchrun: rank 0 wrote the run directory
        click.echo(str(Path(run) / "model.pt"))


def _for_mode(ctx, params: dict, end_to_end: bool) -> str:
    """What the fit reads (--data or --cache), leaving in ``params`` only the options of that mode.

    An option of the other mode given by hand is refused: it would be silently ignored.
    """
    noise_dir, rir_dir, speed = (params.pop(k) for k in AUGMENT)
    cache = params.pop("cache")
    if end_to_end:
        if cache or not params["data"]:
            raise click.UsageError("--end-to-end trains on audio: give --data DIR (and no --cache)")
        given = _given(ctx, CACHE_ONLY)
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply to a fit on a cache, not --end-to-end")
        if params["views"] > 1:
            from mrlcache.augment import AugmentConfig

            params["augment"] = AugmentConfig(noise_dir=noise_dir and str(Path(noise_dir).resolve()),
                                              rir_dir=rir_dir and str(Path(rir_dir).resolve()), speed=speed)
        for name in CACHE_ONLY:
            params.pop(name)
        return params.pop("data")
    if not cache:
        raise click.UsageError("give --cache DIR (from 'mrlcache extract'), or --end-to-end --data DIR")
    given = _given(ctx, E2E_ONLY)
    if given:
        raise click.UsageError(f"{', '.join(given)} only apply with --end-to-end (cache mode reads "
                               "the views extract made)")
    for name in E2E_ONLY:
        params.pop(name, None)
    return cache
