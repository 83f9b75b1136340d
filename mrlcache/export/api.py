"""export_model and verify_export: the export verbs (see :mod:`mrlcache.export`)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from mrlcache.export.formats import FORMATS, TOLERANCE, ExportError
from mrlcache.export.graph import ExportableModel, dynamic_axes, example_inputs
from mrlcache.runtime import atomic_write


def _format(name: str):
    if name not in FORMATS:
        raise ExportError(f"format {name!r}: use one of {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[name])


def _dims(model, dims) -> tuple[int, ...]:
    from mrlcache.dims import select_dims
    from mrlcache.ranges import RangeError

    try:
        return tuple(select_dims(dims, model.dims, flag="dims"))
    except RangeError as err:
        raise ExportError(str(err)) from None


def _metadata(net: ExportableModel, model, dims) -> dict:
    inputs = "wave" if net.wave_in else ",".join(net.input_names)
    return {"format": "mrlcache-export", "version": 1, "dims": list(dims), "width": max(dims),
            "input": inputs, "sample_rate": 16000 if net.wave_in else None,
            "pooled_dim": model.head.pooled_dim, "backbone_sha256": model.weights_sha256}


def export_model(model, path, format: str = "onnx", dims=None, opset: int | None = None) -> Path:
    """Write ``model`` (an MRLModel) as an ONNX or TorchScript file; returns the path.

    Args:
        model: from :func:`mrlcache.load_model` (any head, with or without a backbone).
        path: output file.
        format: a name of :data:`FORMATS`.
        dims: the sizes to export (default every trained size); the output has
            ``max(dims)`` columns and the ``d``-dim embedding is its first ``d``.
        opset: ONNX opset (default 18); not used for TorchScript.
    Raises:
        ExportError: unknown format, dims the model was not trained for, a stream that
            cannot be exported, exporter missing.
    """
    fmt = _format(format)
    if opset is not None and format != "onnx":
        raise ExportError("opset: only ONNX files have an opset; drop it for TorchScript")
    dims = _dims(model, dims)
    model = model.cpu().eval()
    net = ExportableModel(model, max(dims)).eval()
    with torch.no_grad():
        data = fmt.write(net, example_inputs(net, model), net.input_names, dynamic_axes(net, model),
                         _metadata(net, model, dims), opset)
    return atomic_write(Path(path), data)  # a failed export leaves no half-written file


def _runner(path: Path, threads: int | None):
    """(run(*inputs numpy) -> (B, width) numpy, metadata) of the format that claims ``path``."""
    for name in FORMATS:
        fmt = _format(name)
        if name != "onnx" and fmt.claims(path):
            return fmt.runner(path, threads)
    return _format("onnx").runner(path, threads)


def _reference(model, xs, net: ExportableModel) -> torch.Tensor:
    """What ``load_model`` gives for the inputs: MRLModel on the wave, or project on the vectors / streams."""
    with torch.no_grad():
        if net.wave_in:
            return model(xs[0])
        if model.on_streams:
            return model.project(dict(zip(net.input_names, xs)))
        return model.project(xs[0])


def verify_export(path, model, dims=None, lengths=(1.0, 2.37), batches=(1, 3), threads: int | None = None) -> dict:
    """Run an exported file against ``model`` in PyTorch at every length, batch size and dim.

    Args:
        path: a file written by :func:`export_model` (its format told by its content).
        model: the MRLModel it was exported from (as :func:`mrlcache.load_model` gives it).
        dims: the sizes to check (default those the file records, else every trained size).
        lengths: wave lengths in seconds (cached frame streams: as many frames at 100 per
            second; pooled vectors have no length).
        batches: batch sizes.
    Returns:
        {"max_rel_error": float, "passed": bool (<= TOLERANCE), "errors": {(seconds, batch, dim): err}}
        with err = max over rows of |exported - torch| / |torch| of the dim-prefix.
    Raises:
        ExportError: unreadable file, a stream that cannot be exported, or an output of the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    run, meta = _runner(path, threads)
    dims = _dims(model, dims if dims is not None else meta.get("dims"))
    model = model.cpu().eval()
    net = ExportableModel(model, max(dims))
    errors = {}
    for seconds in lengths:
        for batch in batches:
            xs = example_inputs(net, model, batch, seconds, seed=batch)
            want = _reference(model, xs, net)
            got = run(*(x.numpy() for x in xs))
            if got.shape[0] != batch or got.shape[1] < max(dims):
                raise ExportError(f"{path}: output of shape {tuple(got.shape)} for a batch of {batch}; "
                                  f"expected ({batch}, >= {max(dims)})")
            for d in dims:
                ref = want[:, :d].double().numpy()
                diff = np.linalg.norm(got[:, :d] - ref, axis=1) / np.linalg.norm(ref, axis=1)
                errors[(seconds, batch, d)] = float(diff.max())
    worst = max(errors.values())
    return {"max_rel_error": worst, "passed": worst <= TOLERANCE, "errors": errors}
