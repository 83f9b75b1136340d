"""``mrlcache calibrate``: fit a per-dim calibration of a model's scores to LLRs, as JSON.

Scores the calibration trials exactly as ``mrlcache eer`` scores an evaluation list
(:mod:`mrlcache.evaluate`: pooled vectors from an eval-mode cache, the ``mrl`` system,
optional centering and AS-Norm), then fits :func:`mrlcache.calibration.fit_calibration`.
The trials come from *training* speakers (``--make-trials N`` draws them from the cache);
never calibrate on the evaluation list: the standard VoxCeleb test lists are refused by
name. Method and file format: docs/metrics.md ("Calibration").
"""

from __future__ import annotations

from pathlib import Path

import click

from mrlcache.cli.options import verify_option
from mrlcache.config import config_option, write_resolved

# The published VoxCeleb1 evaluation lists (and WeSpeaker's Kaldi versions of them).
EVAL_LISTS = ("veri_test.txt", "veri_test2.txt", "list_test_all.txt", "list_test_all2.txt",
              "list_test_hard.txt", "list_test_hard2.txt")
EVAL_PREFIXES = ("vox1_o", "vox1_e", "vox1_h")


def _fail(message: str):
    raise click.ClickException(message)


def _warn(message: str) -> None:
    click.echo(message, err=True)


def _parse_dims(text, model_dims) -> list[int]:
    if text is None or str(text).strip() == "":
        return list(model_dims)
    try:
        dims = sorted({int(d) for d in str(text).replace(" ", "").split(",") if d})
    except ValueError:
        _fail(f"--dims {text!r}: expected comma-separated integers, e.g. 64,128,256")
    if not dims or any(d not in model_dims for d in dims):
        _fail(f"--dims {text}: the model was trained for dims {list(model_dims)} only")
    return dims


def _beside(out, suffix: str) -> Path:
    """The side file of ``--out X.json``: X.options.yaml, X.trials.txt."""
    return Path(out).with_name(Path(out).stem + suffix)


def _write_trials(trials, path: Path) -> None:
    from mrlcache.runtime import atomic_write

    lines = [f"{int(y)} {e} {t}" for y, e, t in zip(trials.labels, trials.enroll, trials.test)]
    atomic_write(path, "\n".join(lines) + "\n")


@click.command()
@config_option
@verify_option
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="RUN/model.pt written by 'mrlcache fit'.")
@click.option("--cache", "cache_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Eval-mode cache of training-speaker audio (whole utterances), not the evaluation audio.")
@click.option("--trials", "trials_path", type=click.Path(exists=True, dir_okay=False),
              help="Calibration trial list of training speakers (never the evaluation list).")
@click.option("--make-trials", "make_trials", type=int, default=None,
              help="Draw N balanced trials (cross-video targets) from the cache's speakers instead.")
@click.option("--seed", type=int, default=0, show_default=True, help="--make-trials: random seed.")
@click.option("--dims", default=None, help="Comma-separated dims to calibrate; default every dim of the model.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Audio root of the cache's utterances: adds their log durations as quality measures.")
@click.option("--center", "center_cache", type=click.Path(exists=True, file_okay=False),
              help="Training cache whose mean embedding is subtracted (as 'eer --center').")
@click.option("--asnorm-cohort", type=click.Path(exists=True, file_okay=False),
              help="Training cache whose speaker means are the AS-Norm cohort (as 'eer --asnorm-cohort'); "
                   "adds the cohort score means as quality measures.")
@click.option("--snorm-cohort", type=click.Path(exists=True, file_okay=False),
              help="Training cache whose speaker means are the S-Norm cohort (as 'eer --snorm-cohort'); "
                   "adds the cohort score means as quality measures.")
@click.option("--topk", "asnorm_topk", type=int, default=300, show_default=True, help="AS-Norm top-k.")
@click.option("--prior", type=float, default=0.01, show_default=True,
              help="Target prior at which the prior-weighted Cllr is minimised.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Calibration JSON to write, e.g. RUN/calibration.json.")
@click.option("--attach", is_flag=True,
              help="Also write it beside the model as MODEL.calibration.json (e.g. RUN/model.calibration.json).")
@click.option("--device", default="cpu", show_default=True)
@click.pass_context
def calibrate(ctx, model_path, cache_dir, trials_path, make_trials, seed, dims, data_dir, center_cache,
              asnorm_cohort, snorm_cohort, asnorm_topk, prior, out_path, attach, device):
    """Fit a per-dim calibration of cosine scores to log-likelihood ratios (JSON)."""
    if (trials_path is None) == (make_trials is None):
        _fail("give exactly one of --trials FILE (training-speaker trials) or --make-trials N")
    if trials_path is not None:
        name = Path(trials_path).name.lower()
        if name in EVAL_LISTS or name.startswith(EVAL_PREFIXES):
            _fail(f"--trials {trials_path} is a VoxCeleb evaluation list: calibrating on it makes its Cllr "
                  f"meaningless; use trials of training speakers (--make-trials N on a training cache)")
    if not 0.0 < prior < 1.0:
        _fail(f"--prior {prior}: must be in (0, 1)")
    if asnorm_cohort and snorm_cohort:
        _fail("give at most one of --asnorm-cohort and --snorm-cohort")

    from mrlcache.paths import check_output

    inputs = [model_path, trials_path]
    for path in (out_path, _beside(out_path, ".options.yaml"), make_trials and _beside(out_path, ".trials.txt")):
        check_output(path or None, inputs)

    import numpy as np

    from mrlcache import evaluate as ev
    from mrlcache import metrics, scoring
    from mrlcache.calibration import CalibrationError, fit_calibration, make_calibration_trials
    from mrlcache.models.model import ModelError, load_model
    from mrlcache.runtime import sha256_file
    from mrlcache.trials import TrialsError, read_trials

    try:
        model = load_model(model_path, device=device, calibration=False)
    except ModelError as err:
        _fail(str(err))
    dims = _parse_dims(dims, model.dims)

    def opened(path, what):
        try:
            return ev.open_cache_for(path, model, what, log=_warn)
        except ev.EvaluateError as err:
            _fail(str(err))

    cache = opened(cache_dir, "--cache")
    if cache.meta.get("mode") == "train":
        _fail(f"--cache {cache_dir} is a train-mode cache (random crops): calibrate on an eval-mode cache "
              f"of whole training-speaker utterances (mrlcache extract --mode eval), as the trials you will score")
    out = Path(out_path)
    if make_trials is not None:
        try:
            trials = make_calibration_trials(cache.utterances, cache.speakers, make_trials, seed)
        except CalibrationError as err:
            _fail(f"--make-trials {make_trials} on {cache_dir}: {err}")
        trials_path = _beside(out, ".trials.txt")
        _write_trials(trials, trials_path)
        source = {"made": make_trials, "seed": seed, "file": str(trials_path)}
    else:
        try:
            trials = read_trials(trials_path)
        except TrialsError as err:
            _fail(str(err))
        source = {"file": str(trials_path), "sha256": sha256_file(trials_path)}

    try:
        vectors = ev.pooled_from_cache(cache, trials)
        transforms = ev.transforms(model, ["mrl"], device=device)
        stats = {p: ev.cache_stats(opened(p, "cache"), transforms) for p in dict.fromkeys(
            p for p in (center_cache, asnorm_cohort, snorm_cohort) if p)}
    except ev.MissingUtterancesError as err:
        _fail(f"--trials: {err.describe('use trials of utterances in the cache')}")
    except ev.EvaluateError as err:
        _fail(str(err))
    emb = transforms["mrl"](vectors.pooled)  # (U, D)
    rows = {u: i for i, u in enumerate(vectors.utterances)}
    ie, it = vectors.trials.indices(rows)  # (T,), (T,)
    mean = stats[center_cache]["mrl"]["mean"] if center_cache else None
    cohort_path = asnorm_cohort or snorm_cohort
    try:  # the scores and quality measures exactly as 'eer --calibration' makes them
        scores, quality = ev.normalised_scores(  # (n_dims, T), {name: (n_dims, T)}
            emb, ie, it, dims, mean=mean, cohort=stats[cohort_path]["mrl"]["cohort"] if cohort_path else None,
            norm="snorm" if snorm_cohort else "asnorm", topk=asnorm_topk, quality=True)
        if data_dir is not None:
            log_dur = ev.log_durations(data_dir, vectors.utterances, cache.meta.get("max_seconds"))
            quality["log_dur_enroll"] = np.array([log_dur[u] for u in vectors.trials.enroll])
            quality["log_dur_test"] = np.array([log_dur[u] for u in vectors.trials.test])
    except scoring.ScoringError as err:
        _fail(str(err))
    except ev.EvaluateError as err:
        _fail(f"--data {err}")

    info = {"model": str(Path(model_path).resolve()), "model_sha256": sha256_file(model_path),
            "cache": str(Path(cache_dir).resolve()), "trials": source, "system": "mrl",
            "center": center_cache and str(Path(center_cache).resolve()),
            "asnorm": asnorm_cohort and {"cohort": str(Path(asnorm_cohort).resolve()), "topk": asnorm_topk},
            "snorm": snorm_cohort and {"cohort": str(Path(snorm_cohort).resolve())},
            "durations": data_dir and {"data": str(Path(data_dir).resolve()), "max_seconds": cache.meta.get("max_seconds")}}
    try:
        cal = fit_calibration(scores, vectors.trials.labels, dims, quality, prior, info)
    except (CalibrationError, metrics.MetricsError) as err:
        _fail(f"{trials_path}: {err}")
    cal.to_json(out)
    if attach:
        cal.to_json(Path(model_path).with_name(Path(model_path).stem + ".calibration.json"))
    write_resolved(ctx, _beside(out, ".options.yaml"))
    _print_table(cal, f"{out}: {trials.n_target} target / {trials.n_nontarget} non-target calibration trials, "
                      f"prior {prior}")


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
