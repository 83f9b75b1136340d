"""onnxruntime as an engine for extract and embed: the backbone exported once, kept on disk.

The first ``--engine onnxruntime`` run exports the backbone's pooled forward (exportable
front end, dynamo exporter: 40-50 s on 2 cores) and keeps the file under
:func:`engine_cache_dir`, named by the SHA-256 of everything it depends on (weights,
configuration, library versions, opset); later runs read it in under a second, check its
SHA-256 against the record written beside it, and check the session against the torch
backbone on 1 s of noise before use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mrlcache.export import DEFAULT_OPSET, TOLERANCE, ExportableMelBanks, ExportError, _export_onnx
from mrlcache.runtime import atomic_write

ENGINES = ("torch", "onnxruntime")


class ExportablePooled(nn.Module):
    """Wave (B, T) -> ReDimNet's pooled vector (B, pooled_dim), with the exportable front end."""

    def __init__(self, backbone):
        super().__init__()
        import copy

        self.frontend = ExportableMelBanks(backbone.spec)
        self.net = copy.deepcopy(backbone.backbone)
        self.pool = copy.deepcopy(backbone.pool)

    def forward(self, x):
        return self.pool(self.net(self.frontend(x)))


ENGINE_FORMAT = 1  # bump when ExportablePooled or the export changes what a cached file computes


def engine_cache_dir() -> Path:
    """Where exported engines are kept: ``$MRLCACHE_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/mrlcache/engines``
    (``~/.cache/mrlcache/engines``)."""
    import os

    if os.environ.get("MRLCACHE_ENGINE_CACHE"):
        return Path(os.environ["MRLCACHE_ENGINE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mrlcache" / "engines"


def engine_key(backbone, opset: int = DEFAULT_OPSET) -> dict:
    """Everything an exported engine depends on: weights, configuration, library versions, opset."""
    import onnx
    import onnxruntime as ort

    from mrlcache import __version__
    from mrlcache.backbone.loading import state_sha256

    return {"format": ENGINE_FORMAT, "weights_sha256": backbone.weights_sha256 or state_sha256(backbone),
            "model_config": backbone.model_config, "engine": "onnxruntime", "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "torch": torch.__version__, "mrlcache": __version__, "opset": opset}


def _check_engine(session, backbone) -> float:
    """Relative error of a cached engine against the torch backbone on 1 s of noise."""
    wave = 0.1 * torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = backbone.pooled(wave).double().numpy()
    got = session.run(None, {"wave": wave.numpy()})[0]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def cached_engine_bytes(backbone, cache_dir=None, log=None) -> bytes:
    """The ONNX bytes of ``backbone``'s pooled forward, exported once and then read from disk.

    The file is named by the SHA-256 of :func:`engine_key` and written atomically beside a
    JSON record of the key and the file's SHA-256. On load the bytes must match that
    SHA-256; a damaged or mismatched file is exported again (``log`` says so).
    """
    import hashlib

    key = engine_key(backbone)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else engine_cache_dir()
    path, record = folder / f"{digest}.onnx", folder / f"{digest}.json"
    try:
        data = path.read_bytes()
        saved = json.loads(record.read_text())
        if saved.get("key") == json.loads(json.dumps(key)) and saved.get("sha256") == hashlib.sha256(data).hexdigest():
            return data
        if log:
            log(f"note: cached engine {path} does not match its record; exporting it again")
    except (OSError, ValueError):
        pass  # not cached yet
    net = ExportablePooled(backbone).eval()
    example = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        data = _export_onnx(net, example, "wave", {"format": "mrlcache-engine", "dims": [backbone.pooled_dim],
                                                   "key": key}, key["opset"])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
        atomic_write(record, json.dumps({"key": key, "sha256": hashlib.sha256(data).hexdigest()}, indent=1))
    except OSError as err:
        if log:
            log(f"note: cannot keep the exported engine in {folder} ({err}); it is exported again next time")
    return data


class OnnxBackbone:
    """A ReDimNet whose ``pooled(wave)`` runs in onnxruntime (CPU), for ``--engine onnxruntime``.

    The backbone is exported (ExportablePooled, the dynamo exporter) the first time and kept
    on disk (:func:`cached_engine_bytes`: 40-50 s of export here, then under a second), then
    run by an onnxruntime session checked against the torch backbone on 1 s of noise;
    everything else a caller reads (``pooled_dim``, ``model_config``, ``weights_sha256``) is
    the torch backbone's. Its vectors equal PyTorch's to about 1e-6 (tests/test_engine.py).

    Args:
        backbone: the ReDimNet; threads: intra-op threads (default torch's);
        spin: let idle threads busy-wait (faster alone; off when decoding workers share the
            cores); cache_dir: where engines are kept (default :func:`engine_cache_dir`).
    """

    def __init__(self, backbone, threads: int | None = None, spin: bool = True, cache_dir=None, log=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("--engine onnxruntime needs onnxruntime: pip install 'mrlcache[export]'") from None
        self.pooled_dim, self.model_config = backbone.pooled_dim, backbone.model_config
        self.weights_sha256 = backbone.weights_sha256
        backbone = backbone.cpu().eval()
        data = cached_engine_bytes(backbone, cache_dir, log)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        err = _check_engine(self.session, backbone)
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
