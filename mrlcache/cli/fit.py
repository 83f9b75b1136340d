"""``mrlcache fit``: the Matryoshka head on a feature cache (or end to end on audio)."""

from pathlib import Path

import click

from mrlcache.config import config_option, write_resolved


def _ints(text):
    return tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)


def _floats(text):
    return None if text in (None, "") else tuple(float(v) for v in str(text).replace(" ", "").split(",") if v)


@click.command()
@config_option
@click.option("--cache", type=click.Path(file_okay=False), help="Feature cache from 'mrlcache extract'.")
@click.option("--dims", default="64,128,192,256", show_default=True, help="Nested sizes, increasing; '256' alone: a fixed-size head.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--dim-weights", default=None, help="Loss weight per dim, e.g. 1,1,1,1 [default: equal].")
@click.option("--loss", type=click.Choice(["aam", "softmax"]), default="aam", show_default=True)
@click.option("--margin", type=float, default=0.2, show_default=True, help="AAM margin (radians) after warm-up.")
@click.option("--margin-warmup-epochs", type=int, default=5, show_default=True)
@click.option("--scale", type=float, default=32.0, show_default=True)
@click.option("--subcenters", type=int, default=1, show_default=True)
@click.option("--classifier", type=click.Choice(["shared", "per-dim"]), default="shared", show_default=True)
@click.option("--class-sample", type=float, default=1.0, show_default=True,
              help="Share of the classes in each step's softmax: the batch's own plus random others (Partial FC); 1: all.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--weight-decay", type=float, default=1e-2, show_default=True)
@click.option("--scheduler", type=click.Choice(["cosine", "plateau"]), default="cosine", show_default=True)
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True, help="Linear lr warm-up (cosine).")
@click.option("--grad-clip", type=float, default=5.0, show_default=True, help="Max gradient norm; 0: off.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--val-cache", type=click.Path(exists=True, file_okay=False), help="Validation cache (view 0 is used).")
@click.option("--val-trials", type=click.Path(exists=True, dir_okay=False), help="Trial list naming --val-cache utterances.")
@click.option("--val-speakers", type=int, default=None, help="Without --val-cache: held-out training speakers [default: 5%, 2..200]; 0: none.")
@click.option("--val-every", type=int, default=1, show_default=True)
@click.option("--patience", type=int, default=0, show_default=True, help="Stop after this many epochs without a better mean EER; 0: never.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True, help="bf16: CPU autocast, class-score matmuls in bf16 (float32 softmax); slower than fp32 without AMX. CUDA always uses fp16 AMP.")
@click.option("--feature-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--memory-gb", type=float, default=None, help="Memory for features; beyond it they are streamed [default: half the free memory].")
@click.option("--threads", type=int, default=None, help="Torch CPU threads [default: torch's].")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Backbone file (when the cache does not carry it; end to end: the backbone).")
@click.option("--no-embed-backbone", is_flag=True, help="model.pt refers to the backbone by name/path + SHA-256 instead of holding it.")
@click.option("--head-only", is_flag=True, help="model.pt without any backbone (vectors of unknown origin).")
@click.option("--resume", is_flag=True, help="Continue the fit in --out from last.pt.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--end-to-end", is_flag=True, help="Train on audio with the backbone run on the fly.")
@click.option("--data", type=click.Path(exists=True, file_okay=False), help="End to end: VoxCeleb-style audio tree.")
@click.option("--variant", help="End to end: published ReDimNet name (b0..b6, S, M).")
@click.option("--train-type", default="ptn", show_default=True)
@click.option("--dataset", default="vox2", show_default=True)
@click.option("--random-init", is_flag=True, help="End to end: --variant with random weights from --seed.")
@click.option("--crop-seconds", type=float, default=2.0, show_default=True)
@click.option("--min-seconds", type=float, default=0.5, show_default=True,
              help="End to end: shorter files are left out (listed in OUT/skipped.tsv), as in extract.")
@click.option("--views", type=int, default=4, show_default=True, help="End to end: views per utterance, as extract.")
@click.option("--noise-dir", type=click.Path(exists=True, file_okay=False))
@click.option("--rir-dir", type=click.Path(exists=True, file_okay=False))
@click.option("--speed-perturb", is_flag=True)
@click.option("--workers", type=int, default=2, show_default=True, help="End to end: decoding workers.")
@click.option("--unfreeze-after", type=int, default=None, help="End to end: train the backbone from this epoch.")
@click.option("--backbone-lr", type=float, default=1e-5, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.pass_context
def fit(ctx, cache, dims, out, dim_weights, loss, margin, margin_warmup_epochs, scale, subcenters, classifier,
        class_sample, optimizer, lr, weight_decay, scheduler, warmup_epochs, grad_clip, batch_size, epochs, val_cache,
        val_trials, val_speakers, val_every, patience, seed, device, precision, feature_dtype, memory_gb, threads,
        weights, no_embed_backbone, head_only, resume, quiet, end_to_end, data, variant, train_type, dataset,
        random_init, crop_seconds, min_seconds, views, noise_dir, rir_dir, speed_perturb, workers, unfreeze_after,
        backbone_lr, grad_accum):
    """Fit a Matryoshka projection head on cached pooled vectors (minutes), selected by EER.

    Writes OUT/{config.yaml, fingerprint.json, history.jsonl, tensorboard/, last.pt, best.pt,
    model.pt, summary.json}; end to end also OUT/skipped.tsv (audio files left out, with the
    reason). Load the result with mrlcache.load_model(OUT/model.pt).
    """
    if end_to_end:
        from mrlcache.cli import passive_openmp

        passive_openmp()  # before torch: decoding workers share the cores with the backbone
    import torch

    from mrlcache.cache import CacheError
    from mrlcache.fit import FitError, fit_end_to_end
    from mrlcache.fit import fit as run_fit
    from mrlcache.model import ModelError
    from mrlcache.backbone.loading import CheckpointError
    from mrlcache.trials import TrialsError

    if threads:
        torch.set_num_threads(threads)
    try:
        dims_t = _ints(dims)
    except ValueError:
        raise click.BadParameter(f"{dims!r}: expected comma-separated integers, e.g. 64,128,192,256", param_hint="--dims")
    try:
        weights_t = _floats(dim_weights)
    except ValueError:
        raise click.BadParameter(f"{dim_weights!r}: expected comma-separated numbers", param_hint="--dim-weights")
    options = dict(
        dim_weights=weights_t, loss=loss, margin=margin, margin_warmup_epochs=margin_warmup_epochs, scale=scale,
        subcenters=subcenters, classifier=classifier, class_sample=class_sample, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        scheduler=scheduler, warmup_epochs=warmup_epochs, grad_clip=grad_clip, batch_size=batch_size,
        epochs=epochs, val_cache=val_cache, val_trials=val_trials, val_speakers=val_speakers, val_every=val_every,
        patience=patience, seed=seed, device=device, precision=precision, embed_backbone=not no_embed_backbone,
        progress=not quiet,
    )
    try:
        if end_to_end:
            from mrlcache.augment import AugmentConfig

            if cache or not data:
                raise click.UsageError("--end-to-end trains on audio: give --data DIR (and no --cache)")
            augment = AugmentConfig(noise_dir=noise_dir and str(Path(noise_dir).resolve()),
                                    rir_dir=rir_dir and str(Path(rir_dir).resolve()), speed=speed_perturb)
            run = fit_end_to_end(data, dims_t, out, variant=variant, weights=weights, random_init=random_init,
                                 train_type=train_type, dataset=dataset, crop_seconds=crop_seconds,
                                 min_seconds=min_seconds,
                                 views=views,
                                 augment=augment if views > 1 else None, workers=workers,
                                 unfreeze_after=unfreeze_after, backbone_lr=backbone_lr, grad_accum=grad_accum,
                                 resume=resume, **options)
        else:
            if not cache:
                raise click.UsageError("give --cache DIR (from 'mrlcache extract'), or --end-to-end --data DIR")
            # End-to-end options given in cache mode would be silently ignored: refuse them.
            e2e_only = ("data", "variant", "random_init", "unfreeze_after", "train_type", "dataset", "crop_seconds",
                        "min_seconds", "views", "noise_dir", "rir_dir", "speed_perturb", "workers", "backbone_lr", "grad_accum")
            given = [f"--{n.replace('_', '-')}" for n in e2e_only
                     if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]
            if given:
                raise click.UsageError(f"{', '.join(given)} only apply with --end-to-end (cache mode reads "
                                       "the views extract made)")
            run = run_fit(cache, dims_t, out, resume=resume, weights=weights, head_only=head_only,
                          feature_dtype=feature_dtype, memory_gb=memory_gb, **options)
    except (FitError, ModelError, CacheError, CheckpointError, TrialsError) as err:
        raise click.ClickException(str(err))
    write_resolved(ctx, Path(run) / "command.yaml")
    click.echo(str(Path(run) / "model.pt"))
