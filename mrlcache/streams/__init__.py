"""Streams: everything extract can compute and store per utterance, in one registry.

``STREAMS`` maps a stream name to a :class:`StreamSpec`: what it is, whether it is one
vector per utterance or a sequence of frames, and everything that depends on which stream
it is: its shape and frame grid for a given backbone, how it is encoded and chunked on
disk, what an encoder reads from it, the function computing it for a batch of waveforms,
and the module computing it in an exported graph (or why it cannot be). :meth:`StreamSpec.record`
gives the typed record cache.json stores (:class:`~mrlcache.streams.record.StreamRecord`).
Nobody outside a stream's own entry branches on its name. Shapes (time last, channels
first, as the encoders read them):

========= ========================== ============ =====================================
name      per item                   frames/s     what
========= ========================== ============ =====================================
pooled    (pooled_dim,)              utterance    the encoder's pooled statistics (ReDimNet's
                                                  ASTP vector: today's cache)
layers    (L, D, T) or (L, 2D)       100 / 50     the backbone's block outputs
                                                  (:mod:`mrlcache.streams.layers`) or a PTM's
                                                  13 hidden states x 768; ``layers_pooled``:
                                                  mean and std over time per layer instead
fbank     (80, T)                    100          Kaldi log-mel energies, 25 ms / 10 ms
mfcc      (40, T)                    100          Kaldi MFCCs (40 cepstra, 40 bands)
f0        (2, T)                     100          [F0 Hz, NaN if unvoiced; periodicity]
========= ========================== ============ =====================================

fbank, mfcc and f0 share Kaldi's frame grid (``1 + (T - 400) // 160`` frames); a backbone's
layers have its own (``layer_frames``: ``T // 160 + 1`` for ReDimNet and ECAPA-TDNN, half
the Kaldi grid for CAM++, ``(T - 400) // 320 + 1`` for a PTM).

This module imports no torch (the cache reads records through it); computing a stream
imports what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mrlcache.streams.grid import kaldi_frames
from mrlcache.streams.record import StreamRecord


class StreamError(ValueError):
    """A stream that cannot be computed as asked (unknown name, wrong backbone)."""


@dataclass(frozen=True)
class StreamSpec:
    """What one stream is.

    ``compute(waves (B, T), backbone, layers_pooled, window_seconds) -> (B, ...)``
    (``window_seconds``: see :mod:`mrlcache.streams.windows`; None is one pass);
    ``shape(backbone, layers_pooled)``: per item without time; ``grid(backbone)``: (frames
    per second, frames(num_samples)) of a frame stream; ``features(x)``: stored values (B,
    *shape, T) -> what an encoder reads (finite), ``feature_channels`` its channels;
    ``exportable(backbone, layers_pooled)``: an ``nn.Module`` computing ``compute``'s values
    from a wave with operations ONNX and TorchScript export, with ``min_samples`` (the
    shortest wave it takes), or ValueError in one line saying why the stream cannot be
    exported; ``example(x, generator)``: plausible stored values from a standard normal
    draw x (B, *shape, T), for exporting a model that reads the stream cached;
    ``encoder``: the kind of encoder a stream model reads it with
    (:mod:`mrlcache.models.streams`: ``layers``, ``handcrafted`` or ``vector``);
    ``from_ptm``: computed by the PTM instead of the backbone when extract has one.
    """

    name: str
    description: str
    per_frame: bool  # frames over time (False: one vector per utterance)
    needs_backbone: bool
    compute: Callable
    shape: Callable
    grid: Callable | None = None
    dtype: str = "float16"
    encoding: str | None = None  # a name of mrlcache.streams.record.ENCODINGS
    chunking: str = "rows"  # see mrlcache.streams.record.CHUNKINGS
    poolable: bool = False  # layers_pooled stores mean and std over time: a vector
    features: Callable | None = None
    feature_channels: int | None = None  # channels of features(x); None: the stored channels
    exportable: Callable | None = None
    example: Callable | None = None
    encoder: str = "vector"
    from_ptm: bool = False  # a PTM (extract --ptm) computes it instead of the backbone

    def is_frames(self, layers_pooled: bool = False) -> bool:
        return self.per_frame and not (self.poolable and layers_pooled)

    def item_shape(self, backbone=None, layers_pooled: bool = False) -> tuple:
        if self.needs_backbone and backbone is None:
            raise StreamError(f"stream {self.name!r} needs a backbone")
        return tuple(self.shape(backbone, layers_pooled))

    def record(self, backbone, *, layers_pooled: bool, dtype: str, crop_samples: int | None,
               sample_rate: int = 16000) -> StreamRecord:
        """The record cache.json stores for this stream: dense crops of ``crop_samples``, or
        ragged whole utterances (``crop_samples`` None)."""
        frames = self.is_frames(layers_pooled)
        rate = count = None
        if frames:
            rate, count_of = self.grid(backbone, sample_rate)
            count = count_of(crop_samples) if crop_samples is not None else None
        return StreamRecord(self.name, "frames" if frames else "vector", self.item_shape(backbone, layers_pooled),
                            dtype, rate, frames and crop_samples is None, count, self.encoding, self.chunking)

    def encoder_input(self, x):
        """Stored values (B, *shape, T) as the float32 frames an encoder reads."""
        return self.features(x) if self.features is not None else x.float()

    def export_module(self, backbone=None, layers_pooled: bool = False):
        """:attr:`exportable`'s module; ValueError naming the stream and why when there is none."""
        if self.needs_backbone and backbone is None:
            raise StreamError(f"stream {self.name!r} needs the backbone, and this model was saved without one")
        if self.exportable is None:
            raise StreamError(f"stream {self.name!r} has no exportable front end")
        try:
            return self.exportable(backbone, layers_pooled)
        except ValueError as err:
            raise StreamError(f"stream {self.name!r} cannot be exported: {err}") from None

    def input_channels(self, record: StreamRecord) -> int:
        """Channels per frame of :meth:`encoder_input` for a stream stored as ``record``."""
        return int(self.feature_channels) if self.feature_channels is not None else int(record.shape[0])


# -- the streams' own rules (compute imports torch and the stream's module lazily)

def _pooling(backbone):
    """``backbone`` when it has a pooled vector (every encoder of mrlcache.backbone), else StreamError."""
    if not hasattr(backbone, "pooled_dim"):
        raise StreamError(f"stream 'pooled' needs an encoder with a pooled vector (ReDimNet, ECAPA-TDNN, "
                          f"CAM++); {getattr(backbone, 'name', type(backbone).__name__)} has none (use 'layers')")
    return backbone


def _pooled_compute(waves, backbone, layers_pooled, window_seconds):
    from mrlcache.streams import windows

    return windows.pooled(_pooling(backbone), waves, window_seconds)


def _pooled_export(backbone, layers_pooled):
    from mrlcache.streams.layers import Pooled

    return Pooled(_pooling(backbone).exportable())


def _layers_compute(waves, backbone, layers_pooled, window_seconds):
    from mrlcache.streams import windows

    return windows.layers(backbone, waves, window_seconds, stats=layers_pooled)[0]


def _layers_shape(backbone, layers_pooled):
    dims = tuple(backbone.layer_dims)
    if len(set(dims)) != 1:
        who = getattr(backbone, "encoder", None) or getattr(backbone, "name", "this backbone")
        raise StreamError(f"the layers stream stacks {who}'s block outputs, which needs one width; "
                          f"this configuration has {list(dims)}")
    num, dim = len(dims), int(dims[0])
    return (num, 2 * dim) if layers_pooled else (num, dim)


def _layers_grid(backbone, sample_rate):
    if backbone is None:
        raise StreamError("stream 'layers' needs a backbone")
    return float(backbone.layer_rate), backbone.layer_frames


def _layers_export(backbone, layers_pooled):
    from mrlcache.streams.layers import Layers

    return Layers(backbone.exportable(), pooled=layers_pooled)


def _kaldi_grid(backbone, sample_rate):
    return 100.0, lambda n: kaldi_frames(n, sample_rate)


def _handcrafted(fn_name):
    def compute(waves, backbone, layers_pooled, window_seconds):
        from mrlcache.streams import handcrafted

        return getattr(handcrafted, fn_name)(waves)
    return compute


def _yin(waves, backbone, layers_pooled, window_seconds):
    from mrlcache.streams.f0 import yin

    return yin(waves)


def _kaldi_export(kind):
    def exportable(backbone, layers_pooled):
        from mrlcache.streams.handcrafted import ExportableKaldi

        return ExportableKaldi(kind)
    return exportable


def _f0_export(backbone, layers_pooled):
    raise ValueError("its YIN search picks each frame's first dip below a threshold, data-dependent control flow "
                     "an exported graph cannot hold; export a model without f0, or compute f0 yourself and run "
                     "the head on cached streams")


def _f0_example(x, generator):
    """[voiced F0 in Hz, periodicity in [0, 1)] from a standard normal draw (B, 2, T)."""
    import torch

    return torch.stack([100 + 50 * x[:, 0].abs(), torch.rand(x[:, 1].shape, generator=generator)], dim=1)


def _f0_features(x):
    from mrlcache.streams.f0 import f0_features

    return f0_features(x)


STREAMS = {
    "pooled": StreamSpec("pooled", "the encoder's pooled statistics vector", False, True, _pooled_compute,
                         lambda b, p: (_pooling(b).pooled_dim,), dtype="float32", chunking="view",
                         exportable=_pooled_export),
    "layers": StreamSpec("layers", "backbone intermediate outputs per layer", True, True, _layers_compute,
                         _layers_shape, _layers_grid, poolable=True, exportable=_layers_export, encoder="layers",
                         from_ptm=True),
    "fbank": StreamSpec("fbank", "80 Kaldi log-mel energies, 25 ms / 10 ms", True, False, _handcrafted("fbank"),
                        lambda b, p: (80,), _kaldi_grid, exportable=_kaldi_export("fbank"), encoder="handcrafted"),
    "mfcc": StreamSpec("mfcc", "40 Kaldi MFCCs, 25 ms / 10 ms", True, False, _handcrafted("mfcc"),
                       lambda b, p: (40,), _kaldi_grid, exportable=_kaldi_export("mfcc"), encoder="handcrafted"),
    "f0": StreamSpec("f0", "YIN F0 in Hz (NaN unvoiced) and periodicity, 10 ms", True, False, _yin,
                     lambda b, p: (2,), _kaldi_grid, encoding="nan-as-zero", features=_f0_features,
                     feature_channels=2, exportable=_f0_export, example=_f0_example, encoder="handcrafted"),
}


def record_from_json(name: str, info: dict) -> StreamRecord:
    """The record of ``name`` from cache.json's ``info``; missing encoding/chunking from the stream's spec."""
    known = STREAMS.get(name)
    encoding = info.get("encoding", known.encoding if known is not None else None)
    chunking = known.chunking if known is not None else "rows"
    missing = {"kind", "shape", "ragged", "frame_rate", "dtype"} - set(info)
    if missing:
        raise ValueError(f"stream {name!r} lacks {', '.join(sorted(missing))}")
    return StreamRecord(name, info["kind"], tuple(info["shape"]), info["dtype"], info["frame_rate"],
                        bool(info["ragged"]), info.get("frames"), encoding, chunking)


def records_from_meta(meta: dict) -> dict[str, StreamRecord]:
    """{name: record} of the streams a cache holds; the one converter of older cache.json.

    A cache.json without ``streams`` (every cache before streams, and every pooled-only
    cache) holds the pooled vectors alone, ``pooled_dim`` wide in the cache's dtype.
    """
    streams = meta.get("streams")
    if isinstance(streams, dict):
        return {name: record_from_json(name, info) for name, info in streams.items()}
    return {"pooled": record_from_json("pooled", {"kind": "vector", "shape": [int(meta["pooled_dim"])],
                                                  "ragged": False, "frame_rate": None, "dtype": meta["dtype"]})}


# The streams of a model or cache that reads the pooled vector alone (every encoder gives it).
POOLED_ONLY = ("pooled",)


def pooled_only(names) -> bool:
    """True when ``names`` (a model's inputs, a cache's or extract's streams) is ``pooled`` alone."""
    return tuple(names) == POOLED_ONLY


def spec(name: str) -> StreamSpec:
    """The spec of ``name``; StreamError naming the known streams otherwise."""
    if name not in STREAMS:
        raise StreamError(f"unknown stream {name!r}: use one of {', '.join(STREAMS)}")
    return STREAMS[name]


def parse_streams(text: str) -> tuple[str, ...]:
    """'pooled,layers,f0' -> ('pooled', 'layers', 'f0'); each name checked, no repeats."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names:
        raise StreamError("--streams: give at least one stream, e.g. pooled,layers,fbank")
    for n in names:
        spec(n)
    if len(set(names)) != len(names):
        raise StreamError(f"--streams {text}: a stream is listed twice")
    return names


def source(name: str, backbone=None, ptm=None):
    """What computes stream ``name``: the PTM for a stream a PTM gives (``from_ptm``), else the backbone."""
    return ptm if ptm is not None and spec(name).from_ptm else backbone


def item_shape(name: str, backbone=None, layers_pooled: bool = False) -> tuple[int, ...]:
    """Shape of one utterance's stream without the time axis, e.g. (80,) or (L, D)."""
    return spec(name).item_shape(backbone, layers_pooled)


def frame_rate(name: str, backbone=None, sample_rate: int = 16000) -> float | None:
    """Frames per second of a frame stream at ``sample_rate``; None for per-utterance streams."""
    s = spec(name)
    return s.grid(backbone, sample_rate)[0] if s.per_frame else None


def num_frames(name: str, num_samples: int, backbone=None) -> int | None:
    """Frames of a frame stream for ``num_samples`` at 16 kHz; None for per-utterance streams."""
    s = spec(name)
    return s.grid(backbone, 16000)[1](num_samples) if s.per_frame else None


def compute(name: str, waves, backbone=None, layers_pooled: bool = False, window_seconds: float | None = None):
    """Compute stream ``name`` for a batch (B, T) of 16 kHz waveforms, without gradients.

    ``window_seconds``: whole utterances longer than this go through a ReDimNet window by
    window (:mod:`mrlcache.streams.windows`); None (crops, or on request) is one pass.

    Returns (B, *item_shape) for per-utterance streams and pooled layers, else
    (B, *item_shape, frames), float32 (the caller casts to the record's dtype to store).
    """
    import torch

    s = spec(name)
    if s.needs_backbone and backbone is None:
        raise StreamError(f"stream {name!r} needs a backbone")
    with torch.no_grad():
        return s.compute(waves, backbone, layers_pooled, window_seconds).float()


def compute_one(name: str, wave, backbone=None, layers_pooled: bool = False, window_seconds: float | None = None):
    """:func:`compute` for one utterance (T,) -> item without the batch axis."""
    return compute(name, wave[None], backbone, layers_pooled, window_seconds)[0]


_LAZY = {"f0_features": "mrlcache.streams.f0", "yin": "mrlcache.streams.f0", "PTM": "mrlcache.streams.ptm",
         "PTMS": "mrlcache.streams.ptm", "PTMError": "mrlcache.streams.ptm", "load_ptm": "mrlcache.streams.ptm",
         "fbank": "mrlcache.streams.handcrafted", "mfcc": "mrlcache.streams.handcrafted"}


def __getattr__(name):  # torch-importing names on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrlcache.streams' has no attribute {name!r}")


__all__ = ["PTM", "PTMS", "PTMError", "STREAMS", "StreamError", "StreamRecord", "StreamSpec", "compute",
           "compute_one", "f0_features", "frame_rate", "item_shape", "kaldi_frames", "load_ptm", "num_frames",
           "parse_streams", "record_from_json", "records_from_meta", "source", "spec"]
