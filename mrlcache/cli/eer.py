"""``mrlcache eer``: EER and minDCF of a trial list at every Matryoshka dimension.

Parses the options, then calls :mod:`mrlcache.evaluate` (pooled vectors of the trial
utterances from ``--cache`` or ``--data``, the systems mrl/fixed/raw/published/pca/lda, centering and
AS-Norm statistics, scoring) and prints the table, writes JSON and a plot.
Metrics and conventions: docs/metrics.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mrlcache.cli.options import CAP, COUNT, check_device, verify_option, window_option
from mrlcache.config import config_option, write_resolved

SYSTEMS = ("mrl", "fixed", "raw", "published", "pca", "lda")  # as mrlcache.evaluate.SYSTEMS (not imported: keeps --help fast)


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
    from mrlcache.evaluate import EvaluateError
    from mrlcache.evaluate import open_cache_for

    try:
        return open_cache_for(path, model, what, log=_warn)
    except EvaluateError as err:
        _fail(str(err))


def _calibration(path, model_path, dims, center, asnorm, topk, snorm, data_dir):
    """The --calibration file, refused in one line unless it fits this model, these dims and settings."""
    from mrlcache.calibration import Calibration, CalibrationError
    from mrlcache.runtime import sha256_file

    def resolved(p):
        return p and str(Path(p).resolve())

    try:
        cal = Calibration.from_json(path)
        cal.check(model_sha256=sha256_file(model_path), dims=dims, center=resolved(center),
                  asnorm=asnorm and {"cohort": resolved(asnorm), "topk": topk},
                  snorm=snorm and {"cohort": resolved(snorm)}, durations=data_dir is not None)
    except CalibrationError as err:
        _fail(f"--calibration {path}: {err}")
    return cal


def _warn(message: str) -> None:
    click.echo(message, err=True)


def _print_table(results, title, ratios=None, best=None):
    from rich.console import Console
    from rich.table import Table

    caption = "bytes: float32 embedding per utterance; minDCF at p_target .01/.05"
    if ratios:
        caption += "; MRL/fixed: EER of the nested prefix over the fixed-size head's"
    if best:
        caption += "; MRL/best: EER of the nested prefix over the best baseline's at that dim"
    calibrated = any("cllr" in r for r in results)
    if calibrated:
        caption = ("bytes: float32 embedding per utterance; minDCF and actDCF at p_target .01/.05, c_miss = c_fa = 1 "
                   "(normalised); Cllr/minCllr in bits, of the calibrated LLRs")
    table = Table(title=title, caption=caption)
    extra = [("Cllr", "cllr"), ("minCllr", "min_cllr"), ("actDCF .01", "act_dcf_0.01"),
             ("actDCF .05", "act_dcf_0.05")] if calibrated else []
    for name, justify in [("system", "left"), ("dim", "right"), ("EER (%)", "right"), ("threshold", "right"),
                          ("minDCF .01", "right"), ("minDCF .05", "right"), *((n, "right") for n, _ in extra),
                          ("bytes", "right"), *([("MRL/fixed", "right")] if ratios else []),
                          *([("MRL/best", "right")] if best else [])]:
        table.add_column(name, justify=justify)
    for r in results:
        ratio = ratios.get(r["dim"], "") if ratios and r["system"] == "mrl" else ""
        table.add_row(r["system"], str(r["dim"]), f"{100 * r['eer']:.3f}", f"{r['threshold']:.4f}",
                      f"{r['min_dcf_0.01']:.4f}", f"{r['min_dcf_0.05']:.4f}",
                      *(f"{r[k]:.4f}" if k in r else "" for _, k in extra), str(r["bytes_per_utterance"]),
                      *([f"{ratio:.3f}" if isinstance(ratio, float) else ("n/a" if ratio is None else "")]
                        if ratios else []),
                      *([_best_cell(best, r)] if best else []))
    Console().print(table)


def _best_cell(best, row) -> str:
    """'0.950 (lda)' on an mrl row whose dim has a baseline; '' elsewhere."""
    if row["system"] != "mrl" or row["dim"] not in best:
        return ""
    system, ratio = best[row["dim"]]
    return f"{ratio:.3f} ({system})" if ratio is not None else f"n/a ({system})"


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
@verify_option
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="RUN/model.pt written by 'mrlcache fit'.")
@click.option("--trials", "trials_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Trial list: '1 enroll.wav test.wav' (VoxCeleb) or 'enroll test target' (Kaldi).")
@click.option("--cache", "cache_dir", type=click.Path(exists=True, file_okay=False),
              help="Eval-mode cache of the trial audio (pooled vectors).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Audio root the trial paths are relative to (embeds on the fly; beside --cache, only gives "
                   "a --calibration's durations).")
@click.option("--dims", default=None, help="Comma-separated dims to score; default every dim of the model.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(SYSTEMS[1:]),
              help="Also score a baseline (repeatable): raw, published, pca or lda (the published embedding "
                   "after PCA / LDA of a training cache, truncated per dim); fixed (the run's "
                   "--fixed-baselines heads) is scored whenever the run has them. The table gives, per dim, "
                   "the best baseline and MRL's EER over it.")
@click.option("--pca-cache", type=click.Path(exists=True, file_okay=False),
              help="Training cache to fit the PCA of --baseline pca and the LDA of --baseline lda on.")
@click.option("--center", "center_cache", type=click.Path(exists=True, file_okay=False),
              help="Training cache whose mean embedding is subtracted before scoring.")
@click.option("--asnorm-cohort", type=click.Path(exists=True, file_okay=False),
              help="Training cache whose per-speaker means form the AS-Norm cohort.")
@click.option("--asnorm-topk", type=COUNT, default=300, show_default=True, help="AS-Norm top-k cohort scores.")
@click.option("--snorm-cohort", type=click.Path(exists=True, file_okay=False),
              help="Training cache whose per-speaker means form the S-Norm cohort (all of it; not with --asnorm-cohort).")
@click.option("--calibration", "calibration_path", type=click.Path(exists=True, dir_okay=False),
              help="calibration.json from 'mrlcache calibrate': also report Cllr, minCllr and actDCF of mrl.")
@click.option("--skip-missing", is_flag=True, help="Score the trials whose utterances are all available.")
@click.option("--max-seconds", type=CAP, default=None, help="--data: use at most this much of each file.")
@window_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False),
              help="Write a PNG of EER and minDCF against dim (needs matplotlib).")
@click.option("--device", default="cpu", show_default=True)
@click.pass_context
def eer(ctx, model_path, trials_path, cache_dir, data_dir, dims, baselines, pca_cache, center_cache,
        asnorm_cohort, asnorm_topk, snorm_cohort, calibration_path, skip_missing, max_seconds, window_seconds,
        json_out, plot_out, device):
    """EER and minDCF of a trial list at every Matryoshka dim (and baselines), as a table."""
    if (cache_dir is None) == (data_dir is None) and not (cache_dir and calibration_path):
        _fail("give exactly one of --cache (eval cache of the trial audio) or --data (audio root)")
    if asnorm_cohort and snorm_cohort:
        _fail("give at most one of --asnorm-cohort and --snorm-cohort")
    for name in ("pca", "lda"):
        if name in baselines and pca_cache is None:
            _fail(f"--baseline {name} needs --pca-cache TRAIN_CACHE to fit the {name.upper()} on")
    if plot_out is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail("--plot needs matplotlib, which is not installed: pip install 'mrlcache[plot]'")

    from mrlcache.paths import check_output

    inputs = [model_path, trials_path, calibration_path]
    check_output(json_out, inputs, "--json")
    if json_out is not None:
        check_output(Path(json_out).with_name(Path(json_out).stem + ".options.yaml"), inputs, "--json")
    check_output(plot_out, inputs, "--plot")
    check_device(device)
    from mrlcache import evaluate as ev
    from mrlcache import metrics, scoring
    from mrlcache.models.model import ModelError, load_model
    from mrlcache.trials import TrialsError, read_trials

    try:
        trials = read_trials(trials_path)
        model = load_model(model_path, device=device, calibration=False)
    except (TrialsError, ModelError) as err:
        _fail(str(err))
    if trials.duplicates:
        shown = ", ".join(f"line {line} repeats line {was}" for line, was in trials.duplicates[:3])
        _warn(f"{trials_path}: {len(trials.duplicates)} duplicate trial(s) ({shown}); each is scored "
              "as often as it is listed")
    if trials.self_trials:
        i = trials.self_trials[0]
        _warn(f"{trials_path}: {len(trials.self_trials)} trial(s) compare an utterance with itself (e.g. "
              f"{trials.enroll[i]!r}); they score as a perfect match whatever the model, so the EER looks "
              f"better than it is: remove them from the list")
    dims = _parse_dims(dims, model.dims)
    try:
        fixed = ev.fixed_models(model_path, model)
    except ev.EvaluateError as err:
        _fail(str(err))
    if "fixed" in baselines and not fixed:
        _fail(f"--baseline fixed: {Path(model_path).parent} holds no fixed/D/model.pt; fit it with --fixed-baselines")
    systems = ["mrl", *(["fixed"] if fixed else []), *dict.fromkeys(b for b in baselines if b != "fixed")]
    if model.backbone is None and "published" in systems:
        _fail("--baseline published needs the backbone's own head, but this model is head-only")
    if model.inputs != ("pooled",) and (len(systems) > 1 or center_cache or asnorm_cohort or snorm_cohort):
        _fail(f"{model_path} reads streams {', '.join(model.inputs)}: --baseline, --center, --asnorm-cohort and "
              "--snorm-cohort work on pooled-vector models only; score it without them")

    calibration = _calibration(calibration_path, model_path, dims, center_cache, asnorm_cohort, asnorm_topk,
                               snorm_cohort, data_dir) if calibration_path else None
    if cache_dir and data_dir and not any(n.startswith("log_dur") for n in calibration.quality):
        _fail(f"--data beside --cache only gives durations, and --calibration {calibration_path} uses none: drop --data")
    try:
        if cache_dir is not None:
            cache = _open_cache(cache_dir, model, "cache")
            max_seconds = cache.meta.get("max_seconds")  # durations capped as the cache's audio was
            on_streams = model.inputs != ("pooled",)
            vectors = (ev.embeddings_from_cache(cache, model, trials, skip_missing) if on_streams
                       else ev.pooled_from_cache(cache, trials, skip_missing))
        elif model.inputs != ("pooled",) and (model.backbone is not None or not model.needs_backbone):
            # A model on streams computes them from the wave itself.
            model.window_seconds = window_seconds
            vectors = ev.pooled_from_audio(model, data_dir, trials, skip_missing, max_seconds, device)
        else:
            if model.backbone is None:
                _fail("this model was fitted head-only (no backbone): score an eval cache with --cache instead")
            vectors = ev.pooled_from_audio(model.backbone, data_dir, trials, skip_missing, max_seconds, device,
                                           window_seconds=window_seconds)
    except ev.MissingUtterancesError as err:
        _fail(err.describe("pass --skip-missing"))
    except ev.EvaluateError as err:
        _fail(str(err))
    if vectors.missing:
        click.echo(
            f"--skip-missing: {len(vectors.missing)} of {len(trials.utterances)} utterances missing "
            f"(e.g. {', '.join(vectors.missing[:3])}); skipped {vectors.skipped_trials} of {len(trials)} trials",
            err=True,
        )
    trials = vectors.trials

    pca = _open_cache(pca_cache, model, "--pca-cache") if {"pca", "lda"} & set(systems) else None
    try:
        transforms = ev.transforms(model, systems, pca_cache=pca, device=device, fixed=fixed)
    except ev.EvaluateError as err:  # only the PCA / LDA fits can fail here
        _fail(f"--pca-cache {err}")
    stats = {}  # one pass per distinct cache, shared by --center and --asnorm-cohort
    for path in dict.fromkeys(p for p in (center_cache, asnorm_cohort, snorm_cohort) if p):
        try:
            stats[path] = ev.cache_stats(_open_cache(path, model, "cache"), transforms)
        except ev.EvaluateError as err:
            _fail(str(err))
    try:
        durations = None
        if calibration is not None and any(n.startswith("log_dur") for n in calibration.quality):
            durations = ev.log_durations(data_dir, vectors.utterances, max_seconds)
        results = ev.evaluate(trials, vectors.utterances, vectors.pooled, transforms, dims,
                              center=stats.get(center_cache), cohort=stats.get(asnorm_cohort or snorm_cohort),
                              topk=asnorm_topk, norm="snorm" if snorm_cohort else "asnorm",
                              calibration=calibration, durations=durations, log=_warn)
    except ev.EvaluateError as err:
        _fail(f"--data {err}")
    except (metrics.MetricsError, scoring.ScoringError, TrialsError) as err:
        _fail(f"{trials_path}: {err}")

    title = f"{trials_path}: {trials.n_target} target / {trials.n_nontarget} non-target trials"
    if asnorm_cohort:
        title += f", AS-Norm top-{asnorm_topk}"
    if snorm_cohort:
        title += ", S-Norm"
    if calibration_path:
        title += f", calibrated by {calibration_path}"
    ratios = ev.fixed_ratios(results)
    best = ev.best_baseline_ratios(results)
    _print_table(results, title, ratios, best)
    if json_out is not None:
        report = {"trials": str(trials_path), "n_target": trials.n_target, "n_nontarget": trials.n_nontarget,
                  "skipped_trials": vectors.skipped_trials, "results": results}
        if ratios:
            report["mrl_over_fixed_eer"] = {str(d): r for d, r in ratios.items()}
        if best:
            report["mrl_over_best_baseline_eer"] = {str(d): {"system": b, "ratio": r} for d, (b, r) in best.items()}
        if calibration_path:
            report["calibration"] = {"file": str(calibration_path), "system": "mrl", "p_targets": [0.01, 0.05],
                                     "c_miss": 1.0, "c_fa": 1.0, "cllr_unit": "bits"}
        from mrlcache.runtime import atomic_write

        atomic_write(json_out, json.dumps(report, indent=2) + "\n")
        write_resolved(ctx, Path(json_out).with_name(Path(json_out).stem + ".options.yaml"))
    if plot_out is not None:
        _plot(results, plot_out, title)
