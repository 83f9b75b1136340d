"""Front ends from exportable operations: each maps a wave (B, T) to one cached stream.

Each stream's spec owns how it is computed in an exportable graph, or why it cannot be
(:meth:`mrlcache.streams.StreamSpec.export_module`): ``pooled`` and ``layers`` run the
backbone's exportable form (``backbone.exportable()``: ReDimNet behind
:class:`~mrlcache.backbone.features.ExportableMelBanks`, ECAPA-TDNN and CAM++ as they are,
their front ends being written to export); ``fbank`` and ``mfcc`` are
:class:`~mrlcache.streams.handcrafted.ExportableKaldi`; ``f0`` and a pretrained
transformer's layers are refused in one line saying why. :func:`front_end` asks the spec.
"""

from __future__ import annotations

from torch import nn

from mrlcache.export.formats import ExportError


def front_end(stream: str, backbone, layers_pooled: bool = False) -> nn.Module:
    """The exportable module computing ``stream`` from a wave, as extract computes it.

    Raises ExportError in one line naming the stream and why it cannot be exported.
    """
    from mrlcache.streams import StreamError, spec

    try:
        return spec(stream).export_module(backbone, layers_pooled)
    except StreamError as err:
        raise ExportError(str(err)) from None
