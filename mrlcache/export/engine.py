"""onnxruntime as an engine for extract and embed: the backbone's pooled vector, exported into memory."""

from __future__ import annotations

import numpy as np
import torch

from mrlcache.export import onnx
from mrlcache.export.formats import ExportError
from mrlcache.export.frontend import front_end


class OnnxBackbone:
    """A backbone whose ``pooled(wave)`` runs in onnxruntime (CPU), for ``--engine onnxruntime``.

    The backbone is exported once into memory (its ``pooled`` front end, the dynamo exporter) and
    run by an onnxruntime session; everything else a caller reads (``pooled_dim``,
    ``model_config``, ``weights_sha256``) is the torch backbone's. onnxruntime was 1.4-4.4x
    faster than PyTorch on this project's CPU (benchmarks/README.md), and its vectors equal
    PyTorch's to about 1e-6 (tests/test_engine.py).
    """

    def __init__(self, backbone, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("--engine onnxruntime needs onnxruntime: pip install 'mrlcache[export]'") from None
        self.pooled_dim, self.model_config = backbone.pooled_dim, backbone.model_config
        self.weights_sha256 = backbone.weights_sha256
        self.encoder = getattr(backbone, "encoder", "redimnet")
        net = front_end("pooled", backbone.cpu().eval()).eval()  # wave -> pooled vector
        example = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            data = onnx.write(net, (example,), ["wave"], [{0: ("batch", 1), 1: ("samples", net.min_samples)}],
                              {"format": "mrlcache-engine", "dims": [backbone.pooled_dim]}, None)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

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
