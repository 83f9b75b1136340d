"""``mrlcache verify``: is it the same speaker? Cosine, LLR and accept/reject per pair of files.

Thin over :func:`mrlcache.scorer.verify_files`: each file is decoded once, however many
pairs it is in. The LLR and the decision need a calibration attached
to the model (``mrlcache calibrate ... --attach``); without one only the cosine is printed,
with a note saying how to make one. Method: docs/metrics.md ("Verify").
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mrlcache.cli.options import COUNT, PROBABILITY, window_option


def _fail(message: str):
    raise click.ClickException(message)


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="RUN/model.pt (with RUN/model.calibration.json from 'calibrate --attach' for LLRs).")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--pairs", "pairs_path", type=click.Path(exists=True, dir_okay=False),
              help="List of pairs, one 'a.wav b.wav' per line, instead of two FILES.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="--pairs: audio root the paths are relative to (default: the list's folder).")
@click.option("--dim", type=COUNT, default=None, help="Embedding dim to score at; default the model's largest.")
@click.option("--prior", type=PROBABILITY, default=None,
              help="Target prior of the Bayes threshold (default 0.01; c_miss = c_fa = 1).")
@click.option("--far", type=PROBABILITY, default=None,
              help="Threshold at this false-accept rate on the calibration trials instead of --prior.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@window_option
@click.option("--device", default="cpu", show_default=True)
def verify(model_path, files, pairs_path, data_dir, dim, prior, far, json_out, window_seconds, device):
    """Cosine score, calibrated LLR and accept/reject for A.wav B.wav (or each pair of --pairs)."""
    if not ((len(files) == 2 and pairs_path is None) or (not files and pairs_path is not None)):
        _fail("give two audio files A.wav B.wav, or --pairs FILE (not both)")
    if data_dir and not pairs_path:
        _fail("--data is the audio root of --pairs; give the two files' paths directly instead")
    if prior is not None and far is not None:
        _fail("give at most one of --prior and --far")
    from mrlcache.runtime import reuse_large_allocations

    reuse_large_allocations()  # the backbone's activations reuse the heap instead of fresh pages
    from mrlcache.evaluate import EvaluateError
    from mrlcache.models.model import ModelError, load_model
    from mrlcache.paths import check_output
    from mrlcache.scorer import read_pairs, verify_files

    try:
        pairs = read_pairs(pairs_path, data_dir) if pairs_path else [(Path(files[0]), Path(files[1]))]
        check_output(json_out, [model_path, pairs_path, *(p for pair in pairs for p in pair)], "--json")
        model = load_model(model_path, device=device)
        model.window_seconds = window_seconds
        results = verify_files(model, pairs, dim, prior=prior, far=far, name=f"--model {model_path}")
    except (EvaluateError, ModelError) as err:
        _fail(str(err))
    _print(results, model.calibration is not None)
    if json_out is not None:
        report = {"model": str(model_path), "calibrated": model.calibration is not None, "pairs": results}
        from mrlcache.runtime import atomic_write

        atomic_write(json_out, json.dumps(report, indent=2) + "\n")


def _print(results, calibrated: bool):
    from rich.console import Console
    from rich.table import Table

    r0 = results[0]
    point = f"FAR {r0['far']}" if r0["far"] is not None else f"prior {r0['prior']} (c_miss = c_fa = 1)"
    caption = (f"accept if LLR >= {r0['threshold']:.3f}, the threshold for {point}" if calibrated
               else "cosine only: no calibration attached to the model")
    table = Table(title=f"dim {r0['dim']}", caption=caption)
    for name in ("a", "b", "cosine", "LLR", "decision"):
        table.add_column(name, justify="left" if name in "ab" else "right")
    for r in results:
        decision = "" if r["accept"] is None else "accept" if r["accept"] else "reject"
        llr = "" if r["llr"] is None else f"{r['llr']:.3f}"
        table.add_row(r["a"], r["b"], f"{r['score']:.4f}", llr, decision)
    Console().print(table)
    if not calibrated:
        click.echo(r0["note"])
