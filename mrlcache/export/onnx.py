"""The ONNX export format: torch.onnx's dynamo exporter, run with onnxruntime for ``--verify``."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from mrlcache.export.formats import ExportError

DEFAULT_OPSET = 18
SUFFIX = ".onnx"


def write(net, inputs: tuple, names: list, axes: list, meta: dict, opset: int | None) -> bytes:
    """The file's bytes: ``net(*inputs)`` with the named inputs, dynamic ``axes``, ``meta`` in its metadata."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise ExportError(f"ONNX export needs onnx and onnxscript ({err.name} missing): "
                          "pip install 'mrlcache[export]'") from None
    dims = {}
    shapes = tuple({axis: dims.setdefault(name, torch.export.Dim(name, min=low)) for axis, (name, low) in a.items()}
                   for a in axes)
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(net.forward).parameters.values()):
        shapes = (shapes,)  # forward(*xs): the specs of all inputs are the one argument's
    program = torch.onnx.export(net, inputs, dynamo=True, opset_version=opset or DEFAULT_OPSET, input_names=names,
                                output_names=["embedding"], dynamic_shapes=shapes, verbose=False)
    proto = program.model_proto
    for key, value in [("mrlcache.dims", ",".join(map(str, meta["dims"]))), ("mrlcache.json", json.dumps(meta))]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def claims(path: Path) -> bool:
    """Any file TorchScript does not claim is tried as ONNX."""
    return True


def runner(path: Path, threads: int | None):
    """(run(*inputs numpy) -> (B, width) numpy, metadata dict) with onnxruntime on the CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(f"{path}: checking an ONNX file needs onnxruntime: pip install 'mrlcache[export]'") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for unreadable files
        raise ExportError(f"{path}: not an ONNX or TorchScript file onnxruntime can run ({err})") from None
    meta = json.loads(session.get_modelmeta().custom_metadata_map.get("mrlcache.json", "{}"))
    names = [i.name for i in session.get_inputs()]
    return (lambda *xs: session.run(None, dict(zip(names, xs)))[0]), meta
