"""``mrlcache eer``: EER and minDCF of a trial list at every Matryoshka dimension.

Parses the options, then asks a :class:`mrlcache.scorer.Scorer` (the systems
mrl, fixed, raw, published, pca, lda; centering and AS-Norm statistics, calibration) for the trial
vectors from ``--cache`` or ``--data`` and their metrics, and prints the table, writes JSON
and a plot.
Metrics and conventions: docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from mrlcache import names
from mrlcache.cli.options import CAP, DIMS, check_device, check_plot, score_config, score_options, verify_option, window_option
from mrlcache.config import config_option, write_resolved
from mrlcache.paths import check_output
from mrlcache.runtime import atomic_write


def _fail(message: str):
    raise click.ClickException(message)


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
@click.option("--dims", type=DIMS, default=None, help="Comma-separated dims to score; default every dim of the model.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(names.SYSTEMS[1:]),
              help="Also score a baseline (repeatable): raw, published, pca or lda (the published embedding "
                   "after PCA / LDA of a training cache, truncated per dim); fixed (the run's "
                   "--fixed-baselines heads) is scored whenever the run has them. The table gives, per dim, "
                   "the best baseline and MRL's EER over it.")
@click.option("--pca-cache", type=click.Path(exists=True, file_okay=False),
              help="Training cache to fit the PCA of --baseline pca and the LDA of --baseline lda on.")
@score_options
@click.option("--calibration", "calibration_path", type=click.Path(exists=True, dir_okay=False),
              help="calibration.json from 'mrlcache calibrate': also report Cllr, minCllr and actDCF of mrl.")
@click.option("--skip-missing", is_flag=True, help="Score the trials whose utterances are all available.")
@click.option("--max-seconds", type=CAP, default=None, help="--data: use at most this much of each file.")
@window_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False),
              help="Write a PNG (or .pdf, .svg...) of EER and minDCF against dim (needs matplotlib).")
@click.option("--device", default="cpu", show_default=True)
@click.pass_context
def eer(ctx, **params):
    """EER and minDCF of a trial list at every Matryoshka dim (and baselines), as a table."""
    p = params
    if (p["cache_dir"] is None) == (p["data_dir"] is None) and not (p["cache_dir"] and p["calibration_path"]):
        _fail("give exactly one of --cache (eval cache of the trial audio) or --data (audio root)")
    config = score_config(params)
    inputs = [p["model_path"], p["trials_path"], p["calibration_path"]]
    for what, path in (("--json", p["json_out"]), ("--json", _beside(p["json_out"], ".options.yaml")),
                       ("--plot", p["plot_out"])):
        check_output(path, inputs, what)
    check_plot(p["plot_out"])
    check_device(p["device"])
    from mrlcache.scorer import Scorer

    trials = _read_trials(p["trials_path"])
    with _one_line(p["trials_path"]):
        scorer = Scorer(p["model_path"], config, dims=p["dims"], baselines=p["baselines"], pca_cache=p["pca_cache"],
                        calibration=p["calibration_path"], durations=p["data_dir"] is not None, device=p["device"],
                        log=_warn)
        if p["cache_dir"] and p["data_dir"] and not scorer.uses_durations:
            _fail(f"--data beside --cache only gives durations, and --calibration {p['calibration_path']} uses "
                  "none: drop --data")
        vectors = scorer.trial_vectors(trials, p["cache_dir"], p["data_dir"], p["skip_missing"], p["max_seconds"],
                                       p["window_seconds"])
        if vectors.missing:
            _warn(f"--skip-missing: {len(vectors.missing)} of {len(trials.utterances)} utterances missing "
                  f"(e.g. {', '.join(vectors.missing[:3])}); skipped {vectors.skipped_trials} of {len(trials)} trials")
        results = scorer.evaluate(vectors, p["data_dir"])
    trials = vectors.trials
    title = (f"{p['trials_path']}: {trials.n_target} target / {trials.n_nontarget} non-target trials"
             f"{config.describe()}" + (f", calibrated by {p['calibration_path']}" if p["calibration_path"] else ""))
    ratios, best = _ratios(results)
    _print_table(results, title, ratios, best)
    if p["json_out"] is not None:
        _write_json(p["json_out"], p["trials_path"], vectors, results, ratios, best, p["calibration_path"])
        write_resolved(ctx, _beside(p["json_out"], ".options.yaml"))
    if p["plot_out"] is not None:
        _plot(results, p["plot_out"], title)


def _beside(out, suffix: str) -> Path | None:
    """The side file of ``--json X.json``: X.options.yaml."""
    return out and Path(out).with_name(Path(out).stem + suffix)


def _read_trials(path):
    from mrlcache.trials import TrialsError, read_trials

    try:
        trials = read_trials(path)
    except TrialsError as err:
        _fail(str(err))
    if trials.duplicates:
        shown = ", ".join(f"line {line} repeats line {was}" for line, was in trials.duplicates[:3])
        _warn(f"{path}: {len(trials.duplicates)} duplicate trial(s) ({shown}); each is scored "
              "as often as it is listed")
    if trials.self_trials:
        i = trials.self_trials[0]
        _warn(f"{path}: {len(trials.self_trials)} trial(s) compare an utterance with itself (e.g. "
              f"{trials.enroll[i]!r}); they score as a perfect match whatever the model, so the EER looks "
              f"better than it is: remove them from the list")
    return trials


@contextlib.contextmanager
def _one_line(trials_path):
    """The library's refusals as one line each (a scoring failure names the trial list)."""
    from mrlcache import metrics, scoring
    from mrlcache.evaluate import EvaluateError, MissingUtterancesError
    from mrlcache.models.model import ModelError
    from mrlcache.ranges import RangeError
    from mrlcache.trials import TrialsError

    try:
        yield
    except MissingUtterancesError as err:
        _fail(err.describe("pass --skip-missing"))
    except (EvaluateError, ModelError, RangeError) as err:
        _fail(str(err))
    except (metrics.MetricsError, scoring.ScoringError, TrialsError) as err:
        _fail(f"{trials_path}: {err}")


def _ratios(results):
    """MRL's EER over the fixed heads' and over the best baseline's, per dim."""
    from mrlcache.evaluate import best_baseline_ratios, fixed_ratios

    return fixed_ratios(results), best_baseline_ratios(results)


def _write_json(path, trials_path, vectors, results, ratios, best, calibration_path):
    trials = vectors.trials
    report = {"trials": str(trials_path), "n_target": trials.n_target, "n_nontarget": trials.n_nontarget,
              "skipped_trials": vectors.skipped_trials, "results": results}
    if ratios:
        report["mrl_over_fixed_eer"] = {str(d): r for d, r in ratios.items()}
    if best:
        report["mrl_over_best_baseline_eer"] = {str(d): {"system": b, "ratio": r} for d, (b, r) in best.items()}
    if calibration_path:
        report["calibration"] = {"file": str(calibration_path), "system": "mrl", "p_targets": [0.01, 0.05],
                                 "c_miss": 1.0, "c_fa": 1.0, "cllr_unit": "bits"}
    atomic_write(path, json.dumps(report, indent=2) + "\n")
