"""``mrlcache embed``: embeddings of audio files from a fitted model (:func:`mrlcache.embed.embed_files`).

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

A file too short for the encoder (each encoder module's ``min_samples``) or unreadable
stops the run with its name; digital silence is embedded with a warning.
"""

from __future__ import annotations

from pathlib import Path

import click

from mrlcache import names
from mrlcache.cli.options import CAP, COUNT, check_device, window_option
from mrlcache.config import config_option, write_resolved


@click.command()
@config_option
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="RUN/model.pt written by 'mrlcache fit'.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--dim", type=COUNT, default=None, help="Embedding size; default the model's largest.")
@click.option("--out", "out", required=True, type=click.Path(),
              help="emb.npy (one array + emb.ids.txt) or a folder (one .npy per file).")
@click.option("--format", "fmt", type=click.Choice(names.VECTOR_FORMATS), default="npy", show_default=True,
              help="npy: emb.npy + ids or a folder of .npy; kaldi: OUT.ark + OUT.scp; npz: OUT.npz.")
@click.option("--max-seconds", type=CAP, default=None, help="Use at most this much of each file.")
@window_option
@click.option("--device", default="cpu", show_default=True)
@click.option("--engine", type=click.Choice(names.ENGINES), default="torch", show_default=True,
              help="fused: ReDimNet with BatchNorm folded, channels-last (vectors within 1e-5 of torch's); "
                   "onnxruntime: the backbone exported to ONNX and run by onnxruntime on the CPU; "
                   "auto: on the CPU the fastest measured engine that runs the backbone, else torch.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.pass_context
def embed(ctx, model_path, inputs, dim, out, fmt, max_seconds, window_seconds, device, engine, overwrite):
    """Write embeddings of audio FILES or folders (scanned as SPEAKER/.../FILE trees)."""
    check_device(device)
    from mrlcache.runtime import reuse_large_allocations

    reuse_large_allocations()  # the backbone's activations reuse the heap instead of fresh pages
    from mrlcache.embed import EmbedError, audio_inputs, embed_files, embedder, folder_targets, write_folder
    from mrlcache.interop import InteropError, output_paths, write_vectors
    from mrlcache.models.model import ModelError, load_model
    from mrlcache.paths import check_output

    out = Path(out)
    try:
        model = load_model(model_path, device=device)
        model.window_seconds = window_seconds
        dim = model.dims[-1] if dim is None else dim
        embed = embedder(model, dim, engine, device, window_seconds, name=model_path)
        items = audio_inputs(inputs)
        ids = [u for u, _ in items]
        targets = None if out.suffix == ".npy" or fmt != "npy" else folder_targets(out, ids)
        for path in output_paths(fmt, out):  # checked before any file is decoded
            check_output(path, [model_path, *inputs, *(p for _, p in items)], folder=targets is not None)
        there = [str(p) for p in output_paths(fmt, out) if p.exists() and not (p.is_dir() and not any(p.iterdir()))]
        if there and not overwrite:
            raise EmbedError(f"--out: {', '.join(there)} already exist; use --overwrite or another --out")
        if there and targets is not None and not (out / "ids.txt").is_file():
            raise EmbedError(f"--out {out}: a folder not written by 'mrlcache embed' (no ids.txt); "
                             f"--overwrite replaces only those: choose another --out")
        vectors = embed_files(model, [p for _, p in items], dim, max_seconds=max_seconds,
                              window_seconds=window_seconds, device=device, embed=embed)
        if targets is None:  # one file set, written aside and renamed into place
            written = write_vectors(ids, vectors, fmt, out, overwrite=overwrite)
            write_resolved(ctx, Path(written[0]).with_name(Path(written[0]).stem + ".options.yaml"))
        else:
            write_folder(out, targets, ids, vectors, extra=lambda folder: write_resolved(ctx, folder / "options.yaml"))
    except (ModelError, EmbedError, InteropError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{len(ids)} embeddings of dim {dim} -> {out}", err=True)
