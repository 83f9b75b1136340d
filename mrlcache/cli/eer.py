"""``mrlcache eer``: EER and minDCF of a trial list at every Matryoshka dimension.

Pooled backbone vectors of the trial utterances come from an eval-mode cache (``--cache``)
or are computed from audio (``--data``, each file decoded once, whole utterance); every
system below is a function of those pooled vectors, so both modes score identically:

* ``mrl``: the fitted Matryoshka head (``model.project``), at each requested dim;
* ``raw``: the pooled vectors themselves (one row, at the pooled size);
* ``published``: the checkpoint's own BatchNorm + linear head (one row, usually 192);
* ``pca``: the published embedding reduced by PCA fitted on ``--pca-cache``, at each
  requested dim up to the published size (what a Matryoshka head has to beat).

Scores are cosines of L2-normalised prefixes (``mrlcache.scoring``), optionally centred by
a training mean (``--center``) and AS-Norm-ed against per-speaker means of a cohort cache.
Metrics and conventions: docs/metrics.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mrlcache.config import config_option, write_resolved

SYSTEMS = ("mrl", "raw", "published", "pca")
BYTES_PER_VALUE = 4  # embeddings are stored and scored as float32


def _fail(message: str):
    raise click.ClickException(message)


def _parse_dims(text, model_dims) -> list[int]:
    """"64,128" -> [64, 128], each a dim the model was trained for; None -> all of them."""
    if text is None or str(text).strip() == "":
        return list(model_dims)
    try:
        dims = sorted({int(d) for d in str(text).replace(" ", "").split(",") if d})
    except ValueError:
        _fail(f"--dims {text!r}: expected comma-separated integers, e.g. 64,128,256")
    unknown = [d for d in dims if d not in model_dims]
    if unknown or not dims:
        _fail(f"--dims {text}: the model was trained for dims {list(model_dims)} only")
    return dims


def _open_cache(path, model, what: str):
    """Open a cache and refuse it if it was extracted with other backbone weights."""
    from mrlcache import cache as cache_mod

    try:
        cache = cache_mod.open(path)
    except cache_mod.CacheError as err:
        _fail(f"{what} {path}: {err}")
    want, have = model.weights_sha256, cache.meta.get("weights_sha256")
    if want is None or have is None:
        click.echo(
            f"warning: cannot check that {what} {path} matches the model's backbone "
            f"(fingerprint missing: model {want}, cache {have})",
            err=True,
        )
    elif want != have:
        _fail(
            f"{what} {path} was extracted with backbone weights {have}, but the model's backbone "
            f"is {want}; extract it again with the model's backbone"
        )
    if cache.dim != model.head.pooled_dim:
        _fail(f"{what} {path} holds {cache.dim}-d pooled vectors, the model expects {model.head.pooled_dim}")
    return cache


def _missing_error(missing: list[str], where: str, reasons: dict, n_utts: int):
    shown = ", ".join(u + (f" ({reasons[u]})" if u in reasons else "") for u in missing[:5])
    _fail(
        f"{len(missing)} of {n_utts} trial utterances are missing from {where}: {shown}"
        f"{', ...' if len(missing) > 5 else ''}; fix the paths or pass --skip-missing to score the rest"
    )


def _drop_trials(trials, missing: list[str], total_utts: int):
    """Trials without any missing utterance, reported on stderr."""
    import numpy as np

    gone = set(missing)
    keep = np.array([e not in gone and t not in gone for e, t in zip(trials.enroll, trials.test)])
    click.echo(
        f"--skip-missing: {len(missing)} of {total_utts} utterances missing "
        f"(e.g. {', '.join(missing[:3])}); skipped {int((~keep).sum())} of {len(trials)} trials",
        err=True,
    )
    return trials.select(keep), int((~keep).sum())


def _pooled_from_cache(cache, trials, skip_missing):
    """(utterance ids, (U, P) float32 pooled vectors, trials kept, trials skipped)."""
    if cache.meta.get("mode") == "train":
        _fail(
            f"{cache.path} is a train-mode cache (random crops of {cache.meta.get('crop_seconds')} s, "
            f"{cache.num_views} views); score trials on an eval-mode cache of the test audio"
        )
    utts = trials.utterances
    missing = trials.missing(set(cache.utterances))
    skipped = 0
    if missing:
        if not skip_missing:
            _missing_error(missing, f"cache {cache.path}", cache.skipped, len(utts))
        trials, skipped = _drop_trials(trials, missing, len(utts))
        utts = trials.utterances
    view = 0 if cache.num_views > 1 else None
    pooled = cache.pooled(view=view)  # (N, P) or (N, 1, P)
    pooled = pooled.reshape(len(cache), -1)[cache.index_of(utts)]
    return utts, pooled, trials, skipped


def _pooled_from_audio(model, data_dir, trials, skip_missing, max_seconds, device):
    """Decode each trial utterance once (whole, capped at max_seconds) and pool it."""
    import numpy as np
    import torch
    from rich.progress import Progress

    from mrlcache.audio import SAMPLE_RATE, AudioError, load_audio

    if model.backbone is None:
        _fail("this model was fitted head-only (no backbone): score an eval cache with --cache instead")
    data_dir = Path(data_dir)
    utts = trials.utterances
    vectors, reasons = {}, {}
    limit = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
    with Progress(console=_stderr_console(), transient=True) as progress:
        task = progress.add_task("embedding trial audio", total=len(utts))
        for utt in utts:
            path = data_dir / utt
            try:
                if not path.is_file():
                    raise AudioError(path, "unreadable", "no such file")
                wave = load_audio(path)[:limit]  # (T,)
                with torch.no_grad():
                    x = torch.from_numpy(np.ascontiguousarray(wave))[None].to(device)
                    vectors[utt] = model.backbone.pooled(x)[0].cpu().numpy()  # (P,)
            except AudioError as err:
                reasons[utt] = f"{err.reason}: {err.detail}"
            progress.advance(task)
    missing = [u for u in utts if u not in vectors]
    skipped = 0
    if missing:
        if not skip_missing:
            _missing_error(missing, f"audio root {data_dir}", reasons, len(utts))
        trials, skipped = _drop_trials(trials, missing, len(utts))
        utts = trials.utterances
    pooled = np.stack([vectors[u] for u in utts]).astype(np.float32)
    return utts, pooled, trials, skipped


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _transforms(model, device):
    """System name -> function (n, P) pooled float32 -> (n, D) float32 embeddings."""
    import numpy as np
    import torch

    def published(pooled):
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32)).to(device)
            return model.backbone.head(x).cpu().numpy()

    return {
        "mrl": lambda pooled: model.project(pooled),
        "raw": lambda pooled: np.asarray(pooled, dtype=np.float32),
        "published": published,
    }


def _iter_cache(cache, batch=8192):
    """(pooled (n, P) float32, speakers) over every vector of every view, shard by shard."""
    import numpy as np

    for shard in cache.iter_shards():
        pooled = shard.pooled()  # (n, V, P)
        n, views, dim = pooled.shape
        speakers = np.repeat(np.asarray(shard.speakers, dtype=str), views)
        flat = pooled.reshape(n * views, dim)
        for lo in range(0, flat.shape[0], batch):
            yield flat[lo : lo + batch], speakers[lo : lo + batch]


def _fit_pca(cache, published):
    """PCA of published embeddings over a cache: (mean (E,), components (E, E) by column)."""
    import numpy as np

    total, outer, n = None, None, 0
    for pooled, _ in _iter_cache(cache):
        e = published(pooled).astype(np.float64)  # (n, E)
        total = e.sum(axis=0) if total is None else total + e.sum(axis=0)
        outer = e.T @ e if outer is None else outer + e.T @ e
        n += e.shape[0]
    if n < 2:
        _fail(f"--pca-cache {cache.path}: need at least 2 vectors to fit PCA, found {n}")
    mean = total / n
    cov = outer / n - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(cov)  # ascending
    vectors = vectors[:, ::-1]
    # eigh's signs are arbitrary: make each component's largest coordinate positive so the
    # projection (and its scores) do not depend on the LAPACK build.
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    return mean, vectors * signs


def _cache_stats(cache, transforms):
    """Per system: mean embedding and per-speaker means (the AS-Norm cohort) over a cache."""
    import numpy as np

    from mrlcache.scoring import speaker_sums

    acc = {name: {"sum": 0.0, "n": 0, "spk": {}} for name in transforms}
    for pooled, speakers in _iter_cache(cache):
        for name, fn in transforms.items():
            e = fn(pooled).astype(np.float64)
            a = acc[name]
            a["sum"] = a["sum"] + e.sum(axis=0)
            a["n"] += e.shape[0]
            names, sums, counts = speaker_sums(e, speakers)
            for s, row, c in zip(names, sums, counts):
                old = a["spk"].get(s)
                a["spk"][s] = (row, c) if old is None else (old[0] + row, old[1] + c)
    if not acc or next(iter(acc.values()))["n"] == 0:
        _fail(f"{cache.path}: the cache holds no vectors")
    out = {}
    for name, a in acc.items():
        names = sorted(a["spk"])
        cohort = np.stack([a["spk"][s][0] / a["spk"][s][1] for s in names])
        out[name] = {"mean": a["sum"] / a["n"], "cohort": cohort}
    return out


def evaluate(trials, utts, pooled, transforms, dims, *, center=None, cohort=None, topk=300):
    """Score ``trials`` for every system; returns the JSON result rows.

    Args:
        trials: the trials to score; utts, pooled: their utterance ids and (U, P) vectors.
        transforms: {system: pooled (n, P) -> embeddings (n, D)}, in table order.
        dims: requested Matryoshka dims (mrl and pca are scored at each that fits; raw and
            published at their own size).
        center / cohort: {system: stats} from :func:`_cache_stats`, or None.
        topk: AS-Norm top-k.
    """
    from mrlcache import metrics, scoring

    ie, it = trials.indices({u: i for i, u in enumerate(utts)})
    results = []
    for system, transform in transforms.items():
        emb = transform(pooled)  # (U, D)
        width = emb.shape[1]
        if system in ("mrl", "pca"):
            use = [d for d in dims if d <= width]
        else:
            use = [width]
        if not use:
            click.echo(f"note: {system} has {width} dims, none of {dims} fit; not scored", err=True)
            continue
        if system == "pca" and len(use) < len(dims):
            over = [d for d in dims if d > width]
            click.echo(f"note: pca is limited to the published size {width}: dims {over} not scored", err=True)
        mean = None if center is None else center[system]["mean"]
        scores = scoring.score_trials(emb, ie, it, use, mean=mean)  # (n_dims, T)
        if cohort is not None:
            scores = scoring.asnorm(scores, emb, ie, it, cohort[system]["cohort"], topk, use, mean=mean)
        for d, row in zip(use, scores):
            value, threshold = metrics.eer(row, trials.labels)
            results.append({
                "system": system,
                "dim": int(d),
                "eer": value,
                "threshold": threshold,
                "min_dcf_0.01": metrics.min_dcf(row, trials.labels, p_target=0.01),
                "min_dcf_0.05": metrics.min_dcf(row, trials.labels, p_target=0.05),
                "bytes_per_utterance": int(d) * BYTES_PER_VALUE,
            })
    return results


def _print_table(results, title):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption="bytes: float32 embedding per utterance; minDCF at p_target .01/.05")
    for name, justify in [("system", "left"), ("dim", "right"), ("EER (%)", "right"), ("threshold", "right"),
                          ("minDCF .01", "right"), ("minDCF .05", "right"), ("bytes", "right")]:
        table.add_column(name, justify=justify)
    for r in results:
        table.add_row(r["system"], str(r["dim"]), f"{100 * r['eer']:.3f}", f"{r['threshold']:.4f}",
                      f"{r['min_dcf_0.01']:.4f}", f"{r['min_dcf_0.05']:.4f}", str(r["bytes_per_utterance"]))
    Console().print(table)


def _plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for system in dict.fromkeys(r["system"] for r in results):
        rows = [r for r in results if r["system"] == system]
        dims = [r["dim"] for r in rows]
        style = "o-" if len(rows) > 1 else "s"
        axes[0].plot(dims, [100 * r["eer"] for r in rows], style, label=system)
        axes[1].plot(dims, [r["min_dcf_0.01"] for r in rows], style, label=f"{system} (0.01)")
        axes[1].plot(dims, [r["min_dcf_0.05"] for r in rows], style.replace("-", "--"),
                     label=f"{system} (0.05)")
    axes[0].set(xlabel="embedding dim", ylabel="EER (%)", title="EER")
    axes[1].set(xlabel="embedding dim", ylabel="minDCF", title="minDCF")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command()
@config_option
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="RUN/model.pt written by 'mrlcache fit'.")
@click.option("--trials", "trials_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Trial list: '1 enroll.wav test.wav' (VoxCeleb) or 'enroll test target' (Kaldi).")
@click.option("--cache", "cache_dir", type=click.Path(exists=True, file_okay=False),
              help="Eval-mode cache of the trial audio (pooled vectors).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Audio root the trial paths are relative to (embeds on the fly).")
@click.option("--dims", default=None, help="Comma-separated dims to score; default every dim of the model.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(SYSTEMS[1:]),
              help="Also score a baseline (repeatable): raw, published or pca.")
@click.option("--pca-cache", type=click.Path(exists=True, file_okay=False),
              help="Training cache to fit the PCA of --baseline pca on.")
@click.option("--center", "center_cache", type=click.Path(exists=True, file_okay=False),
              help="Training cache whose mean embedding is subtracted before scoring.")
@click.option("--asnorm-cohort", type=click.Path(exists=True, file_okay=False),
              help="Training cache whose per-speaker means form the AS-Norm cohort.")
@click.option("--asnorm-topk", type=int, default=300, show_default=True, help="AS-Norm top-k cohort scores.")
@click.option("--skip-missing", is_flag=True, help="Score the trials whose utterances are all available.")
@click.option("--max-seconds", type=float, default=None, help="--data: use at most this much of each file.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False),
              help="Write a PNG of EER and minDCF against dim (needs matplotlib).")
@click.option("--device", default="cpu", show_default=True)
@click.pass_context
def eer(ctx, model_path, trials_path, cache_dir, data_dir, dims, baselines, pca_cache, center_cache,
        asnorm_cohort, asnorm_topk, skip_missing, max_seconds, json_out, plot_out, device):
    """EER and minDCF of a trial list at every Matryoshka dim (and baselines), as a table."""
    if (cache_dir is None) == (data_dir is None):
        _fail("give exactly one of --cache (eval cache of the trial audio) or --data (audio root)")
    if "pca" in baselines and pca_cache is None:
        _fail("--baseline pca needs --pca-cache TRAIN_CACHE to fit the PCA on")
    if plot_out is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail("--plot needs matplotlib, which is not installed: pip install 'mrlcache[plot]'")

    from mrlcache import metrics, scoring
    from mrlcache.model import ModelError, load_model
    from mrlcache.trials import TrialsError, read_trials

    try:
        trials = read_trials(trials_path)
        model = load_model(model_path, device=device)
    except (TrialsError, ModelError) as err:
        _fail(str(err))
    dims = _parse_dims(dims, model.dims)
    systems = ["mrl", *dict.fromkeys(baselines)]
    if model.backbone is None and {"published", "pca"} & set(systems):
        _fail("--baseline published/pca need the backbone's own head, but this model is head-only")

    if cache_dir is not None:
        cache = _open_cache(cache_dir, model, "cache")
        utts, pooled, trials, skipped = _pooled_from_cache(cache, trials, skip_missing)
    else:
        utts, pooled, trials, skipped = _pooled_from_audio(model, data_dir, trials, skip_missing,
                                                           max_seconds, device)

    transforms = _transforms(model, device)
    if "pca" in systems:
        published = transforms["published"]
        mean, components = _fit_pca(_open_cache(pca_cache, model, "--pca-cache"), published)
        transforms["pca"] = lambda p: ((published(p) - mean) @ components).astype("float32")
    transforms = {s: transforms[s] for s in systems}
    stats = {}  # one pass per distinct cache, shared by --center and --asnorm-cohort
    for path in dict.fromkeys(p for p in (center_cache, asnorm_cohort) if p):
        stats[path] = _cache_stats(_open_cache(path, model, "cache"), transforms)
    try:
        results = evaluate(trials, utts, pooled, transforms, dims, center=stats.get(center_cache),
                           cohort=stats.get(asnorm_cohort), topk=asnorm_topk)
    except (metrics.MetricsError, scoring.ScoringError, TrialsError) as err:
        _fail(f"{trials_path}: {err}")

    title = f"{trials_path}: {trials.n_target} target / {trials.n_nontarget} non-target trials"
    if asnorm_cohort:
        title += f", AS-Norm top-{asnorm_topk}"
    _print_table(results, title)
    if json_out is not None:
        report = {"trials": str(trials_path), "n_target": trials.n_target, "n_nontarget": trials.n_nontarget,
                  "skipped_trials": skipped, "results": results}
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
        write_resolved(ctx, Path(json_out).with_name(Path(json_out).stem + ".options.yaml"))
    if plot_out is not None:
        _plot(results, plot_out, title)
