"""``mrlcache calibrate``: fit a per-dim calibration of a model's scores to LLRs, as JSON.

Scores the calibration trials with the :class:`mrlcache.scorer.Scorer` that ``mrlcache eer``
scores an evaluation list with (vectors from an eval-mode cache, the ``mrl`` system,
optional centering and AS-Norm or S-Norm), then fits :func:`mrlcache.calibration.fit_calibration`.
The trials come from *training* speakers (``--make-trials N`` draws them from the cache);
never calibrate on the evaluation list: the standard VoxCeleb test lists are refused by
name. Method and file format: docs/metrics.md ("Calibration").
"""

from __future__ import annotations

from pathlib import Path

import click

from mrlcache.cli.options import DIMS, PROBABILITY, SEED, COUNT, score_config, score_options, verify_option
from mrlcache.config import config_option, write_resolved
from mrlcache.paths import check_output

# The published VoxCeleb1 evaluation lists (and WeSpeaker's Kaldi versions of them).
EVAL_LISTS = ("veri_test.txt", "veri_test2.txt", "list_test_all.txt", "list_test_all2.txt",
              "list_test_hard.txt", "list_test_hard2.txt")
EVAL_PREFIXES = ("vox1_o", "vox1_e", "vox1_h")


def _fail(message: str):
    raise click.ClickException(message)


def _warn(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@config_option
@verify_option
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="RUN/model.pt written by 'mrlcache fit'.")
@click.option("--cache", "cache_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Eval-mode cache of training-speaker audio (whole utterances), not the evaluation audio.")
@click.option("--trials", "trials_path", type=click.Path(exists=True, dir_okay=False),
              help="Calibration trial list of training speakers (never the evaluation list).")
@click.option("--make-trials", "make_trials", type=COUNT, default=None,
              help="Draw N balanced trials (cross-video targets) from the cache's speakers instead.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="--make-trials: random seed.")
@click.option("--dims", type=DIMS, default=None, help="Comma-separated dims to calibrate; default every dim of the model.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Audio root of the cache's utterances: adds their log durations as quality measures.")
@score_options
@click.option("--prior", type=PROBABILITY, default=0.01, show_default=True,
              help="Target prior at which the prior-weighted Cllr is minimised.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Calibration JSON to write, e.g. RUN/calibration.json.")
@click.option("--attach", is_flag=True,
              help="Also write it beside the model as MODEL.calibration.json (e.g. RUN/model.calibration.json).")
@click.option("--device", default="cpu", show_default=True)
@click.pass_context
def calibrate(ctx, model_path, cache_dir, trials_path, make_trials, seed, dims, data_dir, prior, out_path, attach,
              device, **score):
    """Fit a per-dim calibration of cosine scores to log-likelihood ratios (JSON).

    The scores are made as 'mrlcache eer' makes them, by the same scorer (--center, AS-Norm or
    S-Norm); with a cohort its score means, with --data the log durations, are quality measures.
    """
    _check_trial_source(trials_path, make_trials)
    config = score_config(score)
    inputs = [model_path, trials_path]
    for path in (out_path, _beside(out_path, ".options.yaml"), make_trials and _beside(out_path, ".trials.txt")):
        check_output(path or None, inputs)

    from mrlcache import evaluate as ev
    from mrlcache import metrics, scoring
    from mrlcache.calibration import CalibrationError, fit_calibration
    from mrlcache.models.model import ModelError
    from mrlcache.ranges import RangeError
    from mrlcache.runtime import sha256_file
    from mrlcache.scorer import Scorer
    from mrlcache.trials import TrialsError

    out = Path(out_path)
    try:
        scorer = Scorer(model_path, config, dims=dims, device=device, log=_warn)
        cache = scorer.open(cache_dir, "--cache")
        trials, source = _trials(cache, cache_dir, trials_path, make_trials, seed, out)
        vectors = scorer.trial_vectors(trials, cache)
        scores, quality = scorer.scores(vectors, data_dir)  # (n_dims, T), {name: (n_dims, T) or (T,)}
        info = {"model": str(Path(model_path).resolve()), "model_sha256": sha256_file(model_path),
                "cache": str(Path(cache_dir).resolve()), "trials": source, "system": "mrl", **config.record(),
                "durations": data_dir and {"data": str(Path(data_dir).resolve()), "max_seconds": scorer.max_seconds}}
        cal = fit_calibration(scores, vectors.trials.labels, scorer.dims, quality, prior, info)
    except ev.MissingUtterancesError as err:
        _fail(f"--trials: {err.describe('use trials of utterances in the cache')}")
    except (ModelError, ev.EvaluateError, RangeError, scoring.ScoringError, TrialsError) as err:
        _fail(str(err))
    except (CalibrationError, metrics.MetricsError) as err:
        _fail(f"{trials_path}: {err}")
    cal.to_json(out)
    if attach:
        cal.to_json(Path(model_path).with_name(Path(model_path).stem + ".calibration.json"))
    write_resolved(ctx, _beside(out, ".options.yaml"))
    _print_table(cal, f"{out}: {trials.n_target} target / {trials.n_nontarget} non-target calibration trials, "
                      f"prior {prior}")


def _check_trial_source(trials_path, make_trials) -> None:
    """Exactly one of --trials and --make-trials, and never a VoxCeleb evaluation list."""
    if (trials_path is None) == (make_trials is None):
        _fail("give exactly one of --trials FILE (training-speaker trials) or --make-trials N")
    if trials_path is not None:
        name = Path(trials_path).name.lower()
        if name in EVAL_LISTS or name.startswith(EVAL_PREFIXES):
            _fail(f"--trials {trials_path} is a VoxCeleb evaluation list: calibrating on it makes its Cllr "
                  f"meaningless; use trials of training speakers (--make-trials N on a training cache)")


def _trials(cache, cache_dir, trials_path, make_trials, seed, out: Path):
    """The calibration trials (read, or drawn from the cache and written beside ``out``) and their record."""
    from mrlcache.calibration import CalibrationError, make_calibration_trials
    from mrlcache.runtime import sha256_file
    from mrlcache.trials import read_trials

    if cache.meta.get("mode") == "train":
        _fail(f"--cache {cache_dir} is a train-mode cache (random crops): calibrate on an eval-mode cache "
              f"of whole training-speaker utterances (mrlcache extract --mode eval), as the trials you will score")
    if make_trials is None:
        return read_trials(trials_path), {"file": str(trials_path), "sha256": sha256_file(trials_path)}
    try:
        trials = make_calibration_trials(cache.utterances, cache.speakers, make_trials, seed)
    except CalibrationError as err:
        _fail(f"--make-trials {make_trials} on {cache_dir}: {err}")
    path = _beside(out, ".trials.txt")
    _write_trials(trials, path)
    return trials, {"made": make_trials, "seed": seed, "file": str(path)}


def _beside(out, suffix: str) -> Path:
    """The side file of ``--out X.json``: X.options.yaml, X.trials.txt."""
    return Path(out).with_name(Path(out).stem + suffix)


def _write_trials(trials, path: Path) -> None:
    from mrlcache.runtime import atomic_write

    lines = [f"{int(y)} {e} {t}" for y, e, t in zip(trials.labels, trials.enroll, trials.test)]
    atomic_write(path, "\n".join(lines) + "\n")


def _print_table(cal, title):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption="Cllr in bits on the calibration trials; raw = cosine taken as LLR")
    for name in ("dim", "Cllr raw", "Cllr", "minCllr", "a", "b"):
        table.add_column(name, justify="right")
    for d in cal.dims:
        fit, p = cal.info["fit"][str(d)], cal.params[d]
        table.add_row(str(d), f"{fit['cllr_raw']:.4f}", f"{fit['cllr']:.4f}", f"{fit['min_cllr']:.4f}",
                      f"{p['a']:.3f}", f"{p['b']:.3f}")
    Console().print(table)
