"""Export a fitted model to ONNX or TorchScript, and check an exported file against PyTorch.

Every model ``mrlcache fit`` writes exports (:mod:`mrlcache.export.graph`): a pooled
Matryoshka head, a stream model with any fusion, an ECAPA-TDNN head. The file maps a wave
(B, T) float32 at 16 kHz, dynamic B and T, to one output ``embedding`` (B, max(dims)):
the ``d``-dimensional embedding is its first ``d`` columns (raw, not L2-normalised, as
``MRLModel`` returns it) for every exported ``d``. One output instead of one per dim:
every prefix is in it once, and the dims are written in the file (ONNX metadata
``mrlcache.dims``; TorchScript extra file ``mrlcache.json``). A head-only model takes
what it was fitted on instead: the pooled vectors (input ``pooled``, (B, pooled_dim)), or
one input per cached stream, named by the stream. The streams are computed by exportable
front ends, each stream's spec saying how (:meth:`mrlcache.streams.StreamSpec.export_module`,
asked by :mod:`mrlcache.export.frontend`); a stream that cannot be (F0, a pretrained
transformer's layers) is refused in one line before anything is written.

Formats are modules registered in :data:`~mrlcache.export.formats.FORMATS`, each with ``write``, ``claims`` and
``runner`` (:mod:`mrlcache.export.onnx`, :mod:`mrlcache.export.torchscript`): a new
format is one file and one line here.
"""

from __future__ import annotations

from mrlcache.export.formats import FORMATS, TOLERANCE, ExportError  # noqa: F401 (no torch: the CLI reads them)

# The verbs and modules import torch (and the engine onnxruntime): loaded on first use, so
# that ``mrlcache --help`` can read FORMATS without starting torch.
_LAZY = {"export_model": "mrlcache.export.api", "verify_export": "mrlcache.export.api",
         "ExportableModel": "mrlcache.export.graph", "OnnxBackbone": "mrlcache.export.engine",
         "ExportableMelBanks": "mrlcache.backbone.features", "ExportableKaldi": "mrlcache.streams.handcrafted"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrlcache.export' has no attribute {name!r}")
