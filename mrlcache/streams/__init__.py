"""Streams: everything extract can compute and store per utterance, in one registry.

``STREAMS`` maps a stream name to a :class:`StreamSpec`: what it is, whether it is one
vector per utterance or a sequence of frames, its frame rate, its shape for a given
backbone, the dtype it is stored in (float16 by default) and the function computing it
for a batch of waveforms. Shapes (time last, channels first, as the encoders read them):

========= ========================== ============ =====================================
name      per item                   frames/s     what
========= ========================== ============ =====================================
pooled    (pooled_dim,)              utterance    ReDimNet's ASTP vector (today's cache)
layers    (L, D, T) or (L, 2D)       100 / 50     ReDimNet stem + stage outputs (L = 1 +
                                                  stages, D = F*C) or a PTM's 13 hidden
                                                  states x 768; ``layers_pooled``: mean
                                                  and std over time per layer instead
fbank     (80, T)                    100          Kaldi log-mel energies, 25 ms / 10 ms
mfcc      (40, T)                    100          Kaldi MFCCs (40 cepstra, 40 bands)
f0        (2, T)                     100          [F0 Hz, NaN if unvoiced; periodicity]
========= ========================== ============ =====================================

fbank, mfcc and f0 share Kaldi's frame grid (``1 + (T - 400) // 160`` frames); ReDimNet
layers have ``T // 160 + 1`` frames, PTM layers ``(T - 400) // 320 + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mrlcache.streams.f0 import f0_features, yin
from mrlcache.streams.handcrafted import fbank, kaldi_frames, mfcc
from mrlcache.streams import windows
from mrlcache.streams.layers import mean_std, redimnet_layer_dim, redimnet_num_layers
from mrlcache.streams.ptm import PTM, PTMS, PTMError, load_ptm


class StreamError(ValueError):
    """A stream that cannot be computed as asked (unknown name, wrong backbone)."""


@dataclass(frozen=True)
class StreamSpec:
    """What one stream is. ``compute(waves (B, T), backbone, layers_pooled, window_seconds) -> (B, ...)``

    (``window_seconds``: see :mod:`mrlcache.streams.windows`; None is one pass).
    """

    name: str
    description: str
    per_frame: bool  # frames over time (False: one vector per utterance)
    needs_backbone: bool
    compute: Callable[..., torch.Tensor]
    dtype: str = "float16"


def _is_ptm(backbone) -> bool:
    return isinstance(backbone, PTM)


def _pooled(waves, backbone, layers_pooled, window_seconds):
    if _is_ptm(backbone):
        raise StreamError(f"stream 'pooled' needs a ReDimNet backbone; {backbone.name} has none (use 'layers')")
    return windows.pooled(backbone, waves, window_seconds)


def _layers(waves, backbone, layers_pooled, window_seconds):
    if not _is_ptm(backbone):
        return windows.layers(backbone, waves, window_seconds, stats=layers_pooled)[0]
    frames = torch.stack(backbone.hidden_states(waves), dim=1)  # (B, L, D, T): a PTM, one pass
    return mean_std(frames) if layers_pooled else frames


STREAMS = {
    "pooled": StreamSpec("pooled", "ReDimNet ASTP vector", False, True, _pooled, dtype="float32"),
    "layers": StreamSpec("layers", "backbone intermediate outputs per layer", True, True, _layers),
    "fbank": StreamSpec("fbank", "80 Kaldi log-mel energies, 25 ms / 10 ms", True, False,
                        lambda w, b, p, s: fbank(w)),
    "mfcc": StreamSpec("mfcc", "40 Kaldi MFCCs, 25 ms / 10 ms", True, False, lambda w, b, p, s: mfcc(w)),
    "f0": StreamSpec("f0", "YIN F0 in Hz (NaN unvoiced) and periodicity, 10 ms", True, False,
                     lambda w, b, p, s: yin(w)),
}


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


def item_shape(name: str, backbone=None, layers_pooled: bool = False) -> tuple[int, ...]:
    """Shape of one utterance's stream without the time axis, e.g. (80,) or (L, D)."""
    s = spec(name)
    if s.needs_backbone and backbone is None:
        raise StreamError(f"stream {name!r} needs a backbone")
    if name == "pooled":
        if _is_ptm(backbone):
            raise StreamError(f"stream 'pooled' needs a ReDimNet backbone; {backbone.name} has none")
        return (backbone.pooled_dim,)
    if name == "layers":
        if _is_ptm(backbone):
            num, dim = backbone.num_layers, backbone.layer_dim
        else:
            num, dim = redimnet_num_layers(backbone), redimnet_layer_dim(backbone)
        return (num, 2 * dim) if layers_pooled else (num, dim)
    return {"fbank": (80,), "mfcc": (40,), "f0": (2,)}[name]


def frame_rate(name: str, backbone=None, sample_rate: int = 16000) -> float | None:
    """Frames per second of a frame stream at ``sample_rate``; None for per-utterance streams."""
    s = spec(name)
    if not s.per_frame:
        return None
    if name == "layers":
        if backbone is None:
            raise StreamError("stream 'layers' needs a backbone")
        return float(backbone.frame_rate) if _is_ptm(backbone) else sample_rate / backbone.model_config["hop_length"]
    return 100.0


def num_frames(name: str, num_samples: int, backbone=None) -> int | None:
    """Frames of a frame stream for ``num_samples`` at 16 kHz; None for per-utterance streams."""
    s = spec(name)
    if not s.per_frame:
        return None
    if name == "layers":
        if backbone is None:
            raise StreamError("stream 'layers' needs a backbone")
        if _is_ptm(backbone):
            return max(0, (num_samples - 400) // 320 + 1)
        return num_samples // backbone.model_config["hop_length"] + 1
    return kaldi_frames(num_samples)


def compute(name: str, waves: torch.Tensor, backbone=None, layers_pooled: bool = False,
            window_seconds: float | None = None) -> torch.Tensor:
    """Compute stream ``name`` for a batch (B, T) of 16 kHz waveforms, without gradients.

    ``window_seconds``: whole utterances longer than this go through a ReDimNet window by
    window (:mod:`mrlcache.streams.windows`); None (crops, or on request) is one pass.

    Returns (B, *item_shape) for per-utterance streams and pooled layers, else
    (B, *item_shape, frames), float32 (the caller casts to ``spec(name).dtype`` to store).
    """
    s = spec(name)
    if s.needs_backbone and backbone is None:
        raise StreamError(f"stream {name!r} needs a backbone")
    with torch.no_grad():
        return s.compute(waves, backbone, layers_pooled, window_seconds).float()


def compute_one(name: str, wave: torch.Tensor, backbone=None, layers_pooled: bool = False,
                window_seconds: float | None = None) -> torch.Tensor:
    """:func:`compute` for one utterance (T,) -> item without the batch axis."""
    return compute(name, wave[None], backbone, layers_pooled, window_seconds)[0]


__all__ = ["PTM", "PTMS", "PTMError", "STREAMS", "StreamError", "StreamSpec", "compute", "compute_one",
           "f0_features", "frame_rate", "item_shape", "load_ptm", "num_frames", "parse_streams", "spec"]
