"""``mrlcache verify``: is it the same speaker? Cosine, LLR and accept/reject per pair of files.

Thin over :meth:`mrlcache.models.model.MRLModel.verify`: each file is decoded once and embedded
once, however many pairs it is in. The LLR and the decision need a calibration attached
to the model (``mrlcache calibrate ... --attach``); without one only the cosine is printed,
with a note saying how to make one. Method: docs/metrics.md ("Verify").
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mrlcache.cli.options import window_option


def _fail(message: str):
    raise click.ClickException(message)


def _read_pairs(pairs_path: Path, data_dir) -> list[tuple[Path, Path]]:
    """Lines ``a.wav b.wav`` (blank lines and ``#`` comments skipped), relative to --data or the list's folder."""
    root = Path(data_dir) if data_dir else pairs_path.parent
    try:
        from mrlcache.runtime import read_text

        text = read_text(pairs_path)
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"--pairs {pairs_path}: cannot read it ({err})")
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            _fail(f"--pairs {pairs_path}:{n}: expected two paths 'a.wav b.wav', got {len(fields)} fields")
        pairs.append((root / fields[0], root / fields[1]))
    if not pairs:
        _fail(f"--pairs {pairs_path}: no pairs in it (lines 'a.wav b.wav')")
    return pairs


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="RUN/model.pt (with RUN/model.calibration.json from 'calibrate --attach' for LLRs).")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--pairs", "pairs_path", type=click.Path(exists=True, dir_okay=False),
              help="List of pairs, one 'a.wav b.wav' per line, instead of two FILES.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="--pairs: audio root the paths are relative to (default: the list's folder).")
@click.option("--dim", type=int, default=None, help="Embedding dim to score at; default the model's largest.")
@click.option("--prior", type=float, default=None,
              help="Target prior of the Bayes threshold (default 0.01; c_miss = c_fa = 1).")
@click.option("--far", type=float, default=None,
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
    if prior is not None and not 0.0 < prior < 1.0:
        _fail(f"--prior {prior}: must be in (0, 1)")
    if far is not None and not 0.0 < far < 1.0:
        _fail(f"--far {far}: must be in (0, 1)")
    pairs = _read_pairs(Path(pairs_path), data_dir) if pairs_path else [(Path(files[0]), Path(files[1]))]
    from mrlcache.paths import check_output

    check_output(json_out, [model_path, pairs_path, *(p for pair in pairs for p in pair)], "--json")

    from mrlcache.audio import AudioError, check_wave, load_audio
    from mrlcache.calibration import CalibrationError
    from mrlcache.models.model import ModelError, load_model

    try:
        model = load_model(model_path, device=device)
    except ModelError as err:
        _fail(str(err))
    if model.backbone is None:
        _fail(f"--model {model_path} was fitted head-only (no backbone): verify needs a model.pt with its backbone")
    model.window_seconds = window_seconds
    if dim is not None and dim not in model.dims:
        _fail(f"--dim {dim}: the model was trained for dims {list(model.dims)}")
    if model.calibration is not None and dim is not None and dim not in model.calibration.dims:
        _fail(f"--dim {dim}: the attached calibration covers dims {model.calibration.dims} only")

    waves = {}
    for path in dict.fromkeys(p for pair in pairs for p in pair):
        if not path.is_file():
            _fail(f"{path}: no such audio file")
        try:
            waves[path] = load_audio(path)  # (T,)
        except AudioError as err:
            _fail(f"{path}: cannot decode it ({err.reason}: {err.detail})")
        try:  # as extract skips them: too short for the model's frames, or digital silence
            check_wave(waves[path], path, min_seconds=0.0)
        except AudioError as err:
            _fail(f"{err}; verify needs a file with speech in it")
    # Each file is embedded once (pairs often share files), then every pair is scored.
    results = []
    for a, b in pairs:
        try:
            v = model.verify(waves[a], waves[b], dim, prior=prior, far=far)
        except CalibrationError as err:
            _fail(f"{model_path}: {err}")
        results.append({"a": str(a), "b": str(b), **vars(v)})
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
