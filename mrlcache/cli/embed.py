"""``mrlcache embed``: embeddings of audio files from a fitted model.

Each file is decoded once and embedded whole (``--max-seconds`` caps it; files longer than
``--window-seconds`` go through the backbone window by window, as in extract). The embeddings
are the raw prefix of the Matryoshka head output, as ``mrlcache.load_model(path)(wave,
dim)`` returns them: L2-normalise before cosine scoring.

Output (``--format npy``, the default): ``--out emb.npy`` writes one (N, dim) float32 array
and ``emb.ids.txt`` (the N utterance ids, one per line, same order); ``--out DIR`` writes
``DIR/<utt_id>.npy`` per file (the id's extension replaced) and ``DIR/ids.txt``.
``--format kaldi`` writes ``OUT.ark`` + ``OUT.scp`` (what Kaldi and WeSpeaker scoring read)
and ``--format npz`` one ``OUT.npz`` (``ids``, ``vectors``), through
:func:`mrlcache.interop.write_vectors`. Nothing is written outside DIR
(an id such as ``../x.wav`` is refused) and no two inputs share an output file (``x.wav``
and ``x.flac``); existing outputs are kept unless ``--overwrite``: all are checked before
any file is decoded. A folder output is built aside and replaces the old folder whole (only
a folder embed wrote, with its ``ids.txt``), so no earlier run's files stay beside the new
ones; no output may be an input or hold one (:func:`mrlcache.paths.check_output`).

A file too short for the model's frames (``mrlcache.audio.MIN_SAMPLES``) or unreadable
stops the run with its name; digital silence is embedded with a warning.
"""

from __future__ import annotations

from pathlib import Path

import click

from mrlcache.cli.options import CAP, COUNT, check_device, window_option
from mrlcache.config import config_option, write_resolved


def _inputs(paths) -> list[tuple[str, Path]]:
    """(utterance id, path) of every input.

    A file's id is its path as given; the files of a folder get ids relative to it
    (``id10270/x6uYqmx31kE/00001.wav``, as trial lists and caches name them).
    """
    from mrlcache.corpus import CorpusError, scan_tree

    out = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            try:
                out.extend((u.utt_id, Path(u.path)) for u in scan_tree(p))
            except CorpusError as err:
                raise click.ClickException(str(err)) from None
        else:
            out.append((p.as_posix(), p))
    ids = [u for u, _ in out]
    if len(set(ids)) != len(ids):
        dup = next(u for u in ids if ids.count(u) > 1)
        raise click.ClickException(f"utterance id {dup!r} occurs twice among the inputs; give each file once")
    return out


def _targets(out: Path, ids: list[str]) -> list[Path]:
    """``DIR/<id>.npy`` of every id; refuses one outside DIR or two ids on one file."""
    root = out.resolve()
    targets, owner = [], {}
    for utt in ids:
        target = (out / utt.lstrip("/")).with_suffix(".npy")
        if not target.resolve().is_relative_to(root):
            raise click.ClickException(
                f"input {utt}: its embedding would be written outside --out {out}; give the folder "
                "that holds it as an input (ids are then relative to it) or write one --out FILE.npy"
            )
        key = target.resolve()
        if key in owner:
            raise click.ClickException(
                f"inputs {owner[key]} and {utt} would both be written to {target}; give one of them"
            )
        owner[key] = utt
        targets.append(target)
    return targets


@click.command()
@config_option
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="RUN/model.pt written by 'mrlcache fit'.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--dim", type=COUNT, default=None, help="Embedding size; default the model's largest.")
@click.option("--out", "out", required=True, type=click.Path(),
              help="emb.npy (one array + emb.ids.txt) or a folder (one .npy per file).")
@click.option("--format", "fmt", type=click.Choice(["npy", "kaldi", "npz"]), default="npy", show_default=True,
              help="npy: emb.npy + ids or a folder of .npy; kaldi: OUT.ark + OUT.scp; npz: OUT.npz.")
@click.option("--max-seconds", type=CAP, default=None, help="Use at most this much of each file.")
@window_option
@click.option("--device", default="cpu", show_default=True)
@click.option("--engine", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="onnxruntime: the backbone exported to ONNX and run by onnxruntime on the CPU (faster here).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.pass_context
def embed(ctx, model_path, inputs, dim, out, fmt, max_seconds, window_seconds, device, engine, overwrite):
    """Write embeddings of audio FILES or folders (scanned as SPEAKER/.../FILE trees)."""
    check_device(device)
    from mrlcache.runtime import reuse_large_allocations

    reuse_large_allocations()  # the backbone's activations reuse the heap instead of fresh pages
    import numpy as np
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from mrlcache.audio import SAMPLE_RATE, SILENCE_PEAK, AudioError, check_length, load_audio, peak
    from mrlcache.models.model import ModelError, load_model
    from mrlcache.streams import windows

    try:
        model = load_model(model_path, device=device)
    except ModelError as err:
        raise click.ClickException(str(err)) from None
    model.window_seconds = window_seconds
    dim = model.dims[-1] if dim is None else dim
    if dim not in model.dims:
        raise click.ClickException(f"--dim {dim}: the model was trained for dims {list(model.dims)}")
    if model.backbone is None and model.needs_backbone:  # handcrafted streams need none
        raise click.ClickException(f"{model_path} was fitted head-only (no backbone): it cannot embed audio")
    pooled_by = None  # the torch model computes everything unless --engine onnxruntime
    if engine == "onnxruntime":
        from mrlcache.export import ExportError
        from mrlcache.export.engine import OnnxBackbone

        if model.inputs != ("pooled",) or model.backbone is None or torch.device(device).type != "cpu":
            raise click.ClickException("--engine onnxruntime runs a pooled-vector model with its backbone on the "
                                       "CPU; use the torch engine for this model or device")
        try:
            pooled_by = OnnxBackbone(model.backbone)
        except ExportError as err:
            raise click.ClickException(str(err)) from None
    items = _inputs(inputs)
    out = Path(out)
    from mrlcache.interop import InteropError, output_paths, write_vectors
    from mrlcache.paths import check_output

    targets = None if out.suffix == ".npy" or fmt != "npy" else _targets(out, [u for u, _ in items])
    for path in output_paths(fmt, out):  # checked before any file is decoded
        check_output(path, [model_path, *inputs, *(p for _, p in items)], folder=targets is not None)
    there = [str(p) for p in output_paths(fmt, out) if p.exists() and not (p.is_dir() and not any(p.iterdir()))]
    if there and not overwrite:
        raise click.ClickException(f"--out: {', '.join(there)} already exist; use --overwrite or another --out")
    if there and targets is not None and not (out / "ids.txt").is_file():
        raise click.ClickException(f"--out {out}: a folder not written by 'mrlcache embed' (no ids.txt); "
                                   f"--overwrite replaces only those: choose another --out")
    ids = [u for u, _ in items]
    limit = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
    vectors = np.empty((len(items), dim), dtype=np.float32)
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("embedding", total=len(items))
        for i, (_, path) in enumerate(items):
            try:
                wave = load_audio(path)[:limit]  # (T,)
                check_length(wave, path)
            except AudioError as err:
                raise click.ClickException(f"{err}; remove the file or fix it") from None
            if peak(wave) < SILENCE_PEAK:
                progress.console.print(f"warning: {path}: digital silence (peak below {SILENCE_PEAK:.0e}); "
                                       "its embedding carries no speaker information",
                                       soft_wrap=True, markup=False, highlight=False)
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(wave))[None].to(device)
                emb = (model(x, dim=dim) if pooled_by is None
                       else model.project(windows.pooled(pooled_by, x, window_seconds), dim=dim))
                vectors[i] = emb[0].cpu().numpy()
            progress.advance(task)

    if targets is None:  # one file set, written aside and renamed into place
        try:
            written = write_vectors(ids, vectors, fmt, out, overwrite=overwrite)
        except InteropError as err:
            raise click.ClickException(str(err)) from None
        write_resolved(ctx, Path(written[0]).with_name(Path(written[0]).stem + ".options.yaml"))
    else:  # the folder is built aside and replaces the old one whole: no earlier run's files stay
        from mrlcache.runtime import publish_dir, temp_dir

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(out)
        try:
            for target, vector in zip(targets, vectors):
                target = tmp / target.relative_to(out)
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, vector)
            (tmp / "ids.txt").write_text("\n".join(ids) + "\n")
            write_resolved(ctx, tmp / "options.yaml")
            publish_dir(tmp, out)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
    click.echo(f"{len(ids)} embeddings of dim {dim} -> {out}", err=True)
