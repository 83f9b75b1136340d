"""Export a fitted model to ONNX or TorchScript, and check an exported file against PyTorch.

ReDimNet's own front end (torchaudio's STFT with reflect padding) does not export to ONNX.
:class:`ExportableMelBanks` computes the same log-mel features from operations every
exporter knows: reflect padding built from slices and a constant reversing gather, the DFT
as one fixed strided convolution whose kernels are the window times cos / sin (the window
folded in, zero-padded samples of the window left out), the same mel matrix, log and
normalisation as :class:`~mrlcache.backbone.features.MelBanks`, whose buffers it reuses.

The exported file maps a wave (B, T) float32 at 16 kHz, dynamic B and T, to one output
``embedding`` (B, max(dims)): the ``d``-dimensional embedding is its first ``d`` columns
(raw, not L2-normalised, as ``MRLModel`` returns it) for every exported ``d``. One output
instead of one per dim: every prefix is in it once, and the dims are written in the file
(ONNX metadata ``mrlcache.dims``; TorchScript extra file ``mrlcache.json``). A head-only
model exports the head: input ``pooled`` (B, pooled_dim), same output.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mrlcache.runtime import atomic_write

from mrlcache.names import EXPORT_FORMATS as FORMATS  # noqa: E402 (onnx, torchscript)
DEFAULT_OPSET = 18
TOLERANCE = 1e-4  # largest relative error verify_export accepts


class ExportError(Exception):
    """A model, option or file that cannot be exported or verified."""


# --------------------------------------------------------------------------------------
# Front end
# --------------------------------------------------------------------------------------


class ExportableMelBanks(nn.Module):
    """Log-mel features of MelBanks, from exportable operations.

    Args:
        melbanks: the :class:`~mrlcache.backbone.features.MelBanks` of a backbone; its
            settings, window, mel matrix and pre-emphasis filter are copied.
    Input (B, T) float32 with T > win_length // 2; output (B, n_mels, T // hop + 1) float32.
    """

    def __init__(self, melbanks):
        super().__init__()
        norm, preemph, mel = melbanks.torchfbank
        spec = mel.spectrogram
        if not (spec.center and spec.pad_mode == "reflect" and spec.power == 2.0 and spec.onesided
                and not spec.normalized and spec.pad == 0):
            raise ExportError("this front end only exports a centred, reflect-padded, one-sided power spectrum")
        self.norm_signal = not isinstance(norm, nn.Identity)
        self.spec_norm = melbanks.spec_norm
        self.hop = spec.hop_length
        n_fft, window = spec.n_fft, spec.window.double()  # (win,)
        win = window.numel()
        # torch.stft centres the window in the n_fft frame: the frame's first `offset`
        # samples meet zeros, so the input is padded by `pad` instead of n_fft // 2 and
        # the kernels cover only the window.
        offset = (n_fft - win) // 2
        self.pad = n_fft // 2 - offset
        n = torch.arange(win, dtype=torch.float64) + offset
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
        angle = 2 * math.pi * n[:, None] * k[None, :] / n_fft  # (win, K)
        # sin is zero at k = 0 and k = n_fft / 2: those columns are left out (512, not 514).
        sin_bins = slice(1, n_fft // 2) if n_fft % 2 == 0 else slice(1, None)
        kernels = torch.cat([window[:, None] * torch.cos(angle), window[:, None] * torch.sin(angle[:, sin_bins])], 1)
        self.bins = k.numel()
        self.sin_pad = (1, 1) if n_fft % 2 == 0 else (1, 0)
        self.win = win
        self.register_buffer("dft", kernels.float().contiguous())  # (win, K + K')
        self.register_buffer("mel_fb", mel.mel_scale.fb.detach().clone())  # (K, n_mels)
        self.do_preemph = not isinstance(preemph, nn.Identity)
        taps = preemph.flipped_filter.detach().flatten().clone() if self.do_preemph else torch.zeros(2)
        self.register_buffer("preemph", taps)  # (2,) = [-c, 1]
        # Reflection without flip: gather a fixed reversed index of the edge slices.
        self.register_buffer("reverse", torch.arange(self.pad - 1, -1, -1))  # (pad,)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, n_mels, T')
        x = wave.float()
        if self.norm_signal:
            x = (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True, unbiased=False) + 1e-6)
        if self.do_preemph:
            # y[t] = x[t] - c x[t-1], with x[-1] = x[1] (a reflection by one sample).
            previous = torch.cat([x[:, 1:2], x[:, :-1]], dim=1)
            x = self.preemph[1] * x + self.preemph[0] * previous
        p = self.pad
        left = x[:, 1:p + 1].index_select(1, self.reverse)  # x[p], ..., x[1]
        right = x[:, -p - 1:-1].index_select(1, self.reverse)  # x[T-2], ..., x[T-1-p]
        x = torch.cat([left, x, right], dim=1)  # (B, T + 2p)
        parts = x.unfold(1, self.win, self.hop) @ self.dft  # (B, T', K + K'): the windowed DFT
        re, im = parts[..., :self.bins], parts[..., self.bins:]
        power = re * re + nn.functional.pad(im * im, self.sin_pad)  # (B, T', K)
        x = (power @ self.mel_fb).add(1e-6).log().transpose(1, 2)  # (B, n_mels, T')
        mean = x.mean(dim=-1, keepdim=True)
        if self.spec_norm == "mn":
            return x - mean
        return (x - mean) / (x.std(dim=-1, keepdim=True) + 1e-8)


# --------------------------------------------------------------------------------------
# The exported graph
# --------------------------------------------------------------------------------------


class _Prefix(nn.Module):
    """The head cut to its first ``width`` outputs: (B, pooled_dim) -> (B, width)."""

    def __init__(self, head, width: int):
        super().__init__()
        self.bn = head.bn
        self.linear = nn.Linear(head.pooled_dim, width)
        # Rows past the largest exported dim are never computed.
        with torch.no_grad():
            self.linear.weight.copy_(head.linear.weight[:width])
            self.linear.bias.copy_(head.linear.bias[:width])

    def forward(self, pooled):
        return self.linear(self.bn(pooled))


class ExportableModel(nn.Module):
    """Wave (B, T) -> embedding (B, width) with the exportable front end; head only: pooled in."""

    def __init__(self, model, width: int):
        super().__init__()
        import copy

        self.head = _Prefix(model.head, width)
        backbone = model.backbone
        if backbone is None:
            self.frontend = self.net = self.pool = None
        else:
            self.frontend = ExportableMelBanks(backbone.spec)
            self.net = copy.deepcopy(backbone.backbone)  # frames, as ReDimNet.frames after its front end
            self.pool = copy.deepcopy(backbone.pool)

    def forward(self, x):
        if self.net is None:
            return self.head(x)  # (B, pooled_dim) -> (B, width)
        return self.head(self.pool(self.net(self.frontend(x))))


def _dims(model, dims) -> tuple[int, ...]:
    from mrlcache.dims import select_dims
    from mrlcache.ranges import RangeError

    try:
        return tuple(select_dims(dims, model.dims, flag="dims"))
    except RangeError as err:
        raise ExportError(str(err)) from None


def _example(model, batch: int = 2, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A deterministic input: a wave (batch, seconds * 16 kHz), or pooled vectors for a head-only model."""
    g = torch.Generator().manual_seed(seed)
    if model.backbone is None:
        return torch.randn(batch, model.head.pooled_dim, generator=g)
    n = int(round(seconds * 16000))
    t = torch.arange(n) / 16000
    f0 = 100 + 150 * torch.rand(batch, 1, generator=g)
    harmonics = sum(torch.sin(2 * math.pi * k * f0 * t + k) / k for k in range(1, 20))
    return (0.3 * harmonics / 2 + 0.02 * torch.randn(batch, n, generator=g)).float()


def _metadata(model, dims) -> dict:
    head_only = model.backbone is None
    return {"format": "mrlcache-export", "version": 1, "dims": list(dims), "width": max(dims),
            "input": "pooled" if head_only else "wave", "sample_rate": None if head_only else 16000,
            "pooled_dim": model.head.pooled_dim, "backbone_sha256": model.weights_sha256}


def export_model(model, path, format: str = "onnx", dims=None, opset: int | None = None) -> Path:
    """Write ``model`` (an MRLModel) as an ONNX or TorchScript file; returns the path.

    Args:
        model: from :func:`mrlcache.models.model.load_model` (with or without a backbone).
        path: output file.
        format: "onnx" or "torchscript".
        dims: the sizes to export (default every trained size); the output has
            ``max(dims)`` columns and the ``d``-dim embedding is its first ``d``.
        opset: ONNX opset (default 18); not used for TorchScript.
    Raises:
        ExportError: unknown format, dims the model was not trained for, exporter missing.
    """
    if format not in FORMATS:
        raise ExportError(f"format {format!r}: use one of {', '.join(FORMATS)}")
    if opset is not None and format != "onnx":
        raise ExportError("opset: only ONNX files have an opset; drop it for TorchScript")
    dims = _dims(model, dims)
    path = Path(path)
    net = ExportableModel(model.cpu().eval(), max(dims)).eval()
    example = _example(model)
    meta = _metadata(model, dims)
    name = "pooled" if model.backbone is None else "wave"
    with torch.no_grad():
        if format == "torchscript":
            buffer = io.BytesIO()
            torch.jit.save(torch.jit.trace(net, example, check_trace=False), buffer,
                           _extra_files={"mrlcache.json": json.dumps(meta)})
            data = buffer.getvalue()
        else:
            data = _export_onnx(net, example, name, meta, opset or DEFAULT_OPSET)
    return atomic_write(path, data)  # a failed export leaves no half-written file


def _export_onnx(net, example, name, meta, opset) -> bytes:
    """The ONNX file's bytes: dynamic batch (and length for a wave), dims in its metadata."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise ExportError(f"ONNX export needs onnx and onnxscript ({err.name} missing): "
                          "pip install 'mrlcache[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    axes = {0: batch}
    if name == "wave":
        axes[1] = torch.export.Dim("samples", min=net.frontend.pad + 2)
    program = torch.onnx.export(net, (example,), dynamo=True, opset_version=opset, input_names=[name],
                                output_names=["embedding"], dynamic_shapes={"x": axes}, verbose=False)
    proto = program.model_proto
    for key, value in [("mrlcache.dims", ",".join(map(str, meta["dims"]))), ("mrlcache.json", json.dumps(meta))]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


# --------------------------------------------------------------------------------------
# Checking a file against PyTorch
# --------------------------------------------------------------------------------------


def _runner(path: Path, threads: int | None):
    """(run(input numpy) -> (B, width) numpy, metadata dict) for an exported file."""
    if zipfile.is_zipfile(path):
        extra = {"mrlcache.json": ""}
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = json.loads(extra["mrlcache.json"] or "{}")

        def run(x):
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()
        return run, meta
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
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})[0]), meta


def verify_export(path, model, dims=None, lengths=(1.0, 2.37), batches=(1, 3), threads: int | None = None) -> dict:
    """Run an exported file against ``model`` in PyTorch at every length, batch size and dim.

    Args:
        path: a file written by :func:`export_model` (ONNX or TorchScript, told by its content).
        model: the MRLModel it was exported from.
        dims: the sizes to check (default those the file records, else every trained size).
        lengths: wave lengths in seconds (head-only files take pooled vectors instead).
        batches: batch sizes.
    Returns:
        {"max_rel_error": float, "passed": bool (<= TOLERANCE), "errors": {(seconds, batch, dim): err}}
        with err = max over rows of |exported - torch| / |torch| of the dim-prefix.
    Raises:
        ExportError: unreadable file, or an output of the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    run, meta = _runner(path, threads)
    dims = _dims(model, dims if dims is not None else meta.get("dims"))
    model = model.cpu().eval()
    errors = {}
    for seconds in lengths:
        for batch in batches:
            x = _example(model, batch, seconds, seed=batch)
            with torch.no_grad():
                want = model.head(x) if model.backbone is None else model.head(model.backbone.pooled(x))
            got = run(x.numpy())
            if got.shape[0] != batch or got.shape[1] < max(dims):
                raise ExportError(f"{path}: output of shape {tuple(got.shape)} for a batch of {batch}; "
                                  f"expected ({batch}, >= {max(dims)})")
            for d in dims:
                ref = want[:, :d].double().numpy()
                diff = np.linalg.norm(got[:, :d] - ref, axis=1) / np.linalg.norm(ref, axis=1)
                errors[(seconds, batch, d)] = float(diff.max())
    worst = max(errors.values())
    return {"max_rel_error": worst, "passed": worst <= TOLERANCE, "errors": errors}


# --------------------------------------------------------------------------------------
# onnxruntime as an engine for extract and embed
# --------------------------------------------------------------------------------------

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


class OnnxBackbone:
    """A ReDimNet whose ``pooled(wave)`` runs in onnxruntime (CPU), for ``--engine onnxruntime``.

    The backbone is exported once into memory (ExportablePooled, the dynamo exporter) and
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
        net = ExportablePooled(backbone.cpu().eval()).eval()
        example = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            data = _export_onnx(net, example, "wave", {"format": "mrlcache-engine", "dims": [backbone.pooled_dim]},
                                DEFAULT_OPSET)
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
