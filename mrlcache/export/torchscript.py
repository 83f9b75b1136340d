"""The TorchScript export format: a traced module (``torch.jit.load``), dims in an extra file."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch

from mrlcache.export.formats import ExportError

SUFFIX = ".pt"


def write(net, inputs: tuple, names: list, axes: list, meta: dict, opset: int | None) -> bytes:
    """The file's bytes: ``net`` traced on ``inputs`` (batch and length stay free), ``meta`` as mrlcache.json."""
    if opset is not None:
        raise ExportError("opset: only ONNX files have an opset; drop it for TorchScript")
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(net, inputs, check_trace=False), buffer,
                   _extra_files={"mrlcache.json": json.dumps({**meta, "inputs": names})})
    return buffer.getvalue()


def claims(path: Path) -> bool:
    """TorchScript files are zip archives."""
    return zipfile.is_zipfile(path)


def runner(path: Path, threads: int | None):
    """(run(*inputs numpy) -> (B, width) numpy, metadata dict) with torch.jit."""
    extra = {"mrlcache.json": ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:  # torch raises several types for a zip that is not TorchScript
        raise ExportError(f"{path}: not a TorchScript file ({type(err).__name__}: {err})") from None
    meta = json.loads(extra["mrlcache.json"] or "{}")

    def run(*xs):
        with torch.no_grad():
            return module(*(torch.from_numpy(x) for x in xs)).numpy()
    return run, meta
