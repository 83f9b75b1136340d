"""onnxruntime as an engine for extract and embed: the backbone exported once, kept on disk.

The first ``--engine onnxruntime`` run exports the backbone's pooled forward (its exportable
front end, the dynamo exporter: 40-50 s for b2 on 2 cores) and keeps the file under
:func:`engine_cache_dir`, named by the SHA-256 of everything it depends on (weights,
configuration, library versions, opset); later runs read it in under a second, check its
SHA-256 against the record written beside it, and check the session against the torch
backbone on 1 s of noise before use.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from mrlcache.backbone.registry import wave_minimum
from mrlcache.export import onnx
from mrlcache.export.formats import TOLERANCE, ExportError
from mrlcache.export.frontend import front_end
from mrlcache.runtime import atomic_write, engine_cache_dir

ENGINE_FORMAT = 1  # bump when the front ends or the export change what a cached file computes


def engine_key(backbone, opset: int = onnx.DEFAULT_OPSET) -> dict:
    """Everything an exported engine depends on: weights, configuration, library versions, opset."""
    import onnx as onnx_lib
    import onnxruntime as ort

    from mrlcache import __version__
    from mrlcache.backbone.loading import state_sha256

    return {"format": ENGINE_FORMAT, "encoder": getattr(backbone, "encoder", "redimnet"),
            "weights_sha256": backbone.weights_sha256 or state_sha256(backbone),
            "model_config": getattr(backbone, "model_config", None), "engine": "onnxruntime",
            "onnxruntime": ort.__version__, "onnx": onnx_lib.__version__, "torch": torch.__version__,
            "mrlcache": __version__, "opset": opset}


def _export(backbone, key: dict) -> bytes:
    net = front_end("pooled", backbone).eval()  # wave -> pooled vector
    example = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return onnx.write(net, (example,), ["wave"], [{0: ("batch", 1), 1: ("samples", net.min_samples)}],
                          {"format": "mrlcache-engine", "dims": [backbone.pooled_dim], "key": key}, key["opset"])


def cached_engine_bytes(backbone, cache_dir=None, log=None) -> bytes:
    """The ONNX bytes of ``backbone``'s pooled forward, exported once and then read from disk.

    The file is named by the SHA-256 of :func:`engine_key` and written atomically, then a
    JSON record of the key and the file's SHA-256 beside it. On load the bytes must match
    that record; a damaged or mismatched file is exported again (``log`` says so).
    """
    key = json.loads(json.dumps(engine_key(backbone)))  # plain JSON values, as read back
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else engine_cache_dir()
    path, record = folder / f"{digest}.onnx", folder / f"{digest}.json"
    try:
        data, saved = path.read_bytes(), json.loads(record.read_text())
        if saved.get("key") == key and saved.get("sha256") == hashlib.sha256(data).hexdigest():
            return data
        if log:
            log(f"note: cached engine {path} does not match its record; exporting it again")
    except (OSError, ValueError):
        pass  # not cached yet
    data = _export(backbone, key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
        atomic_write(record, json.dumps({"key": key, "sha256": hashlib.sha256(data).hexdigest()}, indent=1))
    except OSError as err:
        if log:
            log(f"note: cannot keep the exported engine in {folder} ({err}); it is exported again next time")
    return data


def _relative_error(session, backbone) -> float:
    """Relative error of an engine against the torch backbone on 1 s of noise."""
    wave = 0.1 * torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = backbone.pooled(wave).double().numpy()
    try:
        got = session.run(None, {"wave": wave.numpy()})[0]
    except Exception:  # noqa: BLE001 - a graph that does not run on a wave is no engine of this backbone
        return float("inf")
    if got.shape != want.shape:  # another model's graph under this key
        return float("inf")
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


class OnnxBackbone:
    """A backbone whose ``pooled(wave)`` runs in onnxruntime (CPU), for ``--engine onnxruntime``.

    Exported the first time and then read from disk (:func:`cached_engine_bytes`), checked
    against the torch backbone before use; everything else a caller reads (``pooled_dim``,
    ``model_config``, ``weights_sha256``) is the torch backbone's. Its vectors equal
    PyTorch's to about 1e-6 (tests/export/test_engine.py).

    Args:
        backbone: the torch backbone; threads: intra-op threads (default torch's);
        spin: let idle threads busy-wait (faster alone; off where decoding workers share
            the cores, where spinning cost 1.13-1.31x); cache_dir: where engines are kept
            (default :func:`engine_cache_dir`); log: callable for a note line.
    """

    def __init__(self, backbone, threads: int | None = None, spin: bool = True, cache_dir=None, log=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("--engine onnxruntime needs onnxruntime: pip install 'mrlcache[export]'") from None
        self.pooled_dim, self.model_config = backbone.pooled_dim, backbone.model_config
        self.weights_sha256 = backbone.weights_sha256
        self.encoder = getattr(backbone, "encoder", "redimnet")
        self.min_samples = wave_minimum(backbone)[0]
        backbone = backbone.cpu().eval()
        data = cached_engine_bytes(backbone, cache_dir, log)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        err = _relative_error(self.session, backbone)
        if not err <= TOLERANCE:
            raise ExportError(f"the onnxruntime engine differs from the torch backbone (relative error {err:.2g}); "
                              f"delete {engine_cache_dir()} or use --engine torch")

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise ExportError("--engine onnxruntime runs on the CPU: use --device cpu (or the torch engine on CUDA)")
        return self

    def eval(self):
        return self

    def pooled(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, T) float32 at 16 kHz -> (B, pooled_dim) float32, as ReDimNet.pooled."""
        x = np.ascontiguousarray(wave.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"wave": x})[0])
