"""Embeddings of audio files with a fitted model: the verb behind ``mrlcache embed``.

:func:`embed_files` decodes each file once, whole (``max_seconds`` caps it; files longer
than ``window_seconds`` go through the backbone window by window, as in extract), and
returns the raw prefix of the Matryoshka head output, as ``model(wave, dim)`` gives it:
L2-normalise before cosine scoring. :func:`audio_inputs` names the files of the inputs
(folders scanned as speaker trees), :func:`folder_targets` places one ``.npy`` per file
under an output folder without leaving it and :func:`write_folder` writes them.
"""

from __future__ import annotations

from pathlib import Path


class EmbedError(ValueError):
    """Inputs or settings embed cannot use; the message names the file or option and the fix."""


def audio_inputs(paths) -> list[tuple[str, Path]]:
    """(utterance id, path) of every input: a file's id is its path as given; a folder's files
    get ids relative to it (``id10270/x6uYqmx31kE/00001.wav``, as trial lists and caches name them)."""
    from mrlcache.corpus import CorpusError, scan_tree

    out = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            try:
                out.extend((u.utt_id, Path(u.path)) for u in scan_tree(p))
            except CorpusError as err:
                raise EmbedError(str(err)) from None
        else:
            out.append((p.as_posix(), p))
    ids = [u for u, _ in out]
    if len(set(ids)) != len(ids):
        dup = next(u for u in ids if ids.count(u) > 1)
        raise EmbedError(f"utterance id {dup!r} occurs twice among the inputs; give each file once")
    return out


def folder_targets(out: Path, ids: list[str]) -> list[Path]:
    """``out/<id>.npy`` of every id; refuses one outside ``out`` or two ids on one file."""
    root = out.resolve()
    targets, owner = [], {}
    for utt in ids:
        target = (out / utt.lstrip("/")).with_suffix(".npy")
        key = target.resolve()
        if not key.is_relative_to(root):
            raise EmbedError(f"input {utt}: its embedding would be written outside --out {out}; give the folder "
                             "that holds it as an input (ids are then relative to it) or write one --out FILE.npy")
        if key in owner:
            raise EmbedError(f"inputs {owner[key]} and {utt} would both be written to {target}; give one of them")
        owner[key] = utt
        targets.append(target)
    return targets


def embedder(model, dim: int | None = None, engine: str = "torch", device: str = "cpu", window_seconds=None,
             name: str = "the model"):
    """A function wave (1, T) tensor -> embedding (1, dim), after checking that ``model`` (called
    ``name`` in messages) can embed audio at ``dim`` with ``engine``."""
    import torch

    from mrlcache import engines
    from mrlcache.streams import windows

    from mrlcache.dims import select_dim
    from mrlcache.ranges import RangeError

    try:
        dim = select_dim(dim, model.dims)
    except RangeError as err:
        raise EmbedError(str(err)) from None
    if model.backbone is None and model.needs_backbone:  # handcrafted streams need none
        raise EmbedError(f"{name} was fitted head-only (no backbone): it cannot embed audio")
    pooled_model = not model.on_streams and model.backbone is not None
    engine, _ = engines.choose(engine, model.backbone if pooled_model else None,
                               device_type=torch.device(device).type, pooled_float32=True)
    if engine == "torch":
        return lambda x: model(x, dim=dim)
    if not pooled_model:
        raise EmbedError(f"--engine {engine} runs a pooled-vector model's backbone; use the torch engine for {name}")
    if engine == "fused" and not hasattr(model.backbone, "for_inference"):
        raise EmbedError(f"--engine fused is written for ReDimNet backbones; {name} has "
                         f"{getattr(model.backbone, 'encoder', 'another')}: use --engine torch")
    if engine == "onnxruntime" and torch.device(device).type != "cpu":
        raise EmbedError("--engine onnxruntime runs on the CPU; use the torch engine on other devices")
    from mrlcache.export import ExportError

    try:  # fused: a folded copy, the model keeps its own backbone
        pooled_by = engines.engine_backbone(engine, model.backbone)
    except ExportError as err:
        raise EmbedError(str(err)) from None
    return lambda x: model.project(windows.pooled(pooled_by, x, window_seconds), dim=dim)


def embed_files(model, paths, dim: int | None = None, *, max_seconds=None, window_seconds=None, device="cpu",
                engine: str = "torch", embed=None, warn=None, progress: bool = True):
    """Embed every file of ``paths`` once: (N, dim) float32, rows in order.

    Args:
        model: a loaded :class:`mrlcache.model.MRLModel` (its ``window_seconds`` is set here).
        dim: embedding size (default the model's largest); max_seconds: cap on each file.
        engine: one of ``names.ENGINES`` (:mod:`mrlcache.engines`); fused, onnxruntime and auto's
            CPU choice run a pooled-vector model's backbone.
        embed: the function of :func:`embedder` when the caller checked the model already.
        warn: callable for a warning line (a file of digital silence is embedded with one;
            default: a line on stderr above the progress bar).
    Raises EmbedError for an unreadable or too-short file, naming it.
    """
    import numpy as np
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from mrlcache.audio import SAMPLE_RATE, SILENCE_PEAK, AudioError, check_length, load_audio, peak
    from mrlcache.backbone.registry import wave_minimum
    from mrlcache.streams.windows import WINDOW_SECONDS

    window_seconds = WINDOW_SECONDS if window_seconds is None else window_seconds
    model.window_seconds = window_seconds
    dim = model.dims[-1] if dim is None else dim
    embed = embed or embedder(model, dim, engine, device, window_seconds)
    limit = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
    minimum = wave_minimum(model.backbone)
    vectors = np.empty((len(paths), dim), dtype=np.float32)
    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("embedding", total=len(paths))
        for i, path in enumerate(paths):
            try:
                wave = load_audio(path)[:limit]  # (T,)
                check_length(wave, path, minimum=minimum)
            except AudioError as err:
                raise EmbedError(f"{err}; remove the file or fix it") from None
            if peak(wave) < SILENCE_PEAK:
                (warn or _printer(bar))(f"warning: {path}: digital silence (peak below {SILENCE_PEAK:.0e}); "
                     "its embedding carries no speaker information")
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(wave))[None].to(device)  # (1, T)
                vectors[i] = embed(x)[0].cpu().numpy()
            bar.advance(task)
    return vectors


def write_folder(out: Path, targets: list[Path], ids: list[str], vectors, extra=None) -> None:
    """``out/<id>.npy`` per row and ``out/ids.txt``, built aside and put in place of ``out`` whole
    (no earlier run's files stay beside the new ones); ``extra(folder)`` may add files to it."""
    import shutil

    import numpy as np

    from mrlcache.runtime import publish_dir, temp_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out)
    try:
        for target, vector in zip(targets, vectors):
            target = tmp / target.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, vector)
        (tmp / "ids.txt").write_text("\n".join(ids) + "\n")
        if extra is not None:
            extra(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _printer(bar):
    return lambda line: bar.console.print(line, soft_wrap=True, markup=False, highlight=False)
