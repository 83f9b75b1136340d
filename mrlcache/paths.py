"""Where a command may write: one guard for every output path.

No command writes over one of its own inputs (paths resolved, links followed) or over a
file a cache or a run directory keeps for itself (``cache.json``, ``manifest.tsv``,
``model.pt``, ``config.yaml``, ``last.pt``, ...): :func:`check_output` refuses both in one
line before any work starts. :func:`check_run_dir` is the rule for ``fit --out``, and
:func:`check_inputs` the regular-file rule for every input file (a FIFO would hang).
"""

from __future__ import annotations

import os
from pathlib import Path

from mrlcache.runtime import PathRefused, check_regular

# A cache directory's own entries (cache/format.py; backbone.pt: extract/run.py). Kept
# literal so the guard does not import the storage backends; a test keeps them in step.
CACHE_FILES = ("cache.json", "manifest.tsv", "skipped.tsv", "sources.tsv", "backbone.pt")
CACHE_DIRS = ("shards", "locks")
# What a run directory holds (fit/rundir.py, fit/loop.py, fit/report.py; a test checks a
# real run's files against it).
RUN_FILES = ("config.yaml", "fingerprint.json", "history.jsonl", "last.pt", "best.pt", "model.pt",
             "summary.json", "curves.png", "model_summary.json", "model_summary.txt", "gating.json",
             "gating.png", "skipped.tsv", "backbone.pt", ".fit.lock", "tensorboard", "fixed")
RUN_MARKERS = ("model.pt", "last.pt", "config.yaml", "fingerprint.json")


class OutputPathError(PathRefused):
    """An output that would destroy an input or a cache's or run's own file."""


def _real(path) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also catches hard links
    except OSError:
        return _real(a) == _real(b)


def is_cache_dir(path) -> bool:
    return (Path(path) / CACHE_FILES[0]).is_file()


def is_run_dir(path) -> bool:
    return any((Path(path) / name).is_file() for name in RUN_MARKERS)


def check_output(out, inputs=(), option: str = "--out", folder: bool = False) -> None:
    """Refuse ``out`` when it is one of ``inputs`` or a cache's or a run's own file.

    Args:
        out: the file (or folder) a command is about to write.
        inputs: every path the command reads (files or folders; None entries are skipped).
        option: how the user gave ``out``, for the message ("--json").
        folder: ``out`` is a folder the command replaces as a whole: no input may lie
            inside it either.

    Raises:
        OutputPathError: one line naming the clash and the fix.
    """
    if out is None:
        return
    real = _real(out)
    for given in inputs:
        if given is not None and _same(real, Path(given)):
            raise OutputPathError(f"{option} {out}: is the input {given}; writing it would destroy it; "
                                  f"choose another path")
        if folder and given is not None and _real(given).is_relative_to(real):
            raise OutputPathError(f"{option} {out}: holds the input {given}, and is replaced as a whole; "
                                  f"choose another path")
    parent = real.parent
    if is_cache_dir(parent) and real.name in CACHE_FILES + CACHE_DIRS:
        raise OutputPathError(f"{option} {out}: is the cache {parent}'s own {real.name}; choose a path "
                              f"outside the cache's files")
    for folder in [parent, *parent.parents]:
        if folder.name in CACHE_DIRS and is_cache_dir(folder.parent):
            raise OutputPathError(f"{option} {out}: is inside the cache {folder.parent}'s {folder.name}/; "
                                  f"choose a path outside the cache")
    if real.name in RUN_FILES and is_run_dir(parent):
        raise OutputPathError(f"{option} {out}: is the run {parent}'s own {real.name}; choose another name")


def check_run_dir(out, inputs=()) -> None:
    """``fit --out``: a new or empty folder, a resumable run (last.pt), or a fit that died early.

    Refused: a cache, one of the fit's inputs, and a folder with a ``model.pt`` or a
    ``config.yaml`` but no ``last.pt`` (a finished run whose checkpoint was removed, or
    files of another program): fitting there would replace them.
    """
    out = Path(out)
    for given in inputs:
        if given is not None and _same(out, Path(given)):
            raise OutputPathError(f"--out {out}: is the input {given}; choose another --out")
    if not out.is_dir():
        return
    if is_cache_dir(out):
        raise OutputPathError(f"--out {out}: is a cache; choose a run directory outside it")
    if (out / "last.pt").exists():
        return  # a run of ours: open_run resumes it or asks for --resume
    theirs = (out / "model.pt").exists() or ((out / "config.yaml").exists() and not (out / "fingerprint.json").exists())
    if theirs:
        raise OutputPathError(f"--out {out}: holds a model.pt or config.yaml but no last.pt, so it is not a "
                              f"resumable run; fitting would replace them: choose another --out")


def check_inputs(*paths, option: str = "") -> None:
    """Refuse every input file that is not a regular file (a FIFO, a device): reading it could hang."""
    for path in paths:
        if path is not None:
            check_regular(path, option)
