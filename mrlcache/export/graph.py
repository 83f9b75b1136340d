"""The graph an export holds: a fitted model's inputs -> one embedding (B, max(dims)).

:class:`ExportableModel` wraps any model ``load_model`` gives:

- with a backbone (or on handcrafted streams only): a wave (B, T) in; every stream the
  model reads is computed by its exportable front end (:func:`~mrlcache.export.frontend.front_end`),
  then the model's own modules run as in PyTorch;
- head-only on the pooled vector: the vectors (B, pooled_dim) in;
- head-only on streams a backbone makes (e.g. imported layer stacks): each cached stream
  in, named by the stream, as ``MRLModel.project`` takes them.

The output is the model's head output cut to ``width`` columns: the ``d``-dimensional
embedding is its first ``d`` columns, raw.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from mrlcache.export.frontend import front_end
from mrlcache.streams import STREAMS, StreamError, spec


def _wave_in(model) -> bool:
    """A wave goes in when every stream can be computed from it with what the model holds."""
    return model.backbone is not None or not model.needs_backbone


def _frozen(module: nn.Module) -> nn.Module:
    """``module`` with every parametrisation (e.g. an orthogonal weight, computed by a matrix
    exponential no exporter knows) replaced by the weight it gives now: the same outputs."""
    from torch.nn.utils import parametrize

    for m in list(module.modules()):
        if parametrize.is_parametrized(m):
            with torch.no_grad():
                values = {name: getattr(m, name).detach().clone() for name in m.parametrizations}
            # Per instance (torch's remove_parametrizations edits the class the original shares).
            m.__class__ = type(m).__bases__[0]
            del m._modules["parametrizations"]
            for name, value in values.items():
                m._parameters[name] = nn.Parameter(value, requires_grad=False)
    return module


class ExportableModel(nn.Module):
    """Inputs (see the module docstring) -> embedding (B, width). Raises ExportError for a
    stream whose front end cannot be exported."""

    def __init__(self, model, width: int):
        super().__init__()
        self.width = int(width)
        self.head = _frozen(copy.deepcopy(model.head).eval())
        self.on_streams = model.on_streams
        self.streams = list(model.inputs)
        self.wave_in = _wave_in(model)
        self.fronts = nn.ModuleDict()
        if self.wave_in:
            pooled_layers = getattr(model.head, "layers_pooled", False)
            for s in self.streams:
                self.fronts[s] = front_end(s, model.backbone, layers_pooled=pooled_layers)
        self.input_names = ["wave"] if self.wave_in else list(self.streams)
        self.min_samples = max((f.min_samples for f in self.fronts.values()), default=0)  # shortest wave taken


    def forward(self, *xs):
        if self.wave_in:
            batch = {s: f(xs[0]) for s, f in self.fronts.items()}
        else:
            batch = dict(zip(self.streams, xs))
        out = self.head(batch) if self.on_streams else self.head(batch[self.streams[0]])
        return out[:, :self.width]


def _stream_shapes(model) -> dict:
    """{stream: shape without batch and time, frames (bool)} of a model's cached inputs."""
    if not model.on_streams:
        return {"pooled": ((model.head.pooled_dim,), False)}
    from mrlcache.streams import item_shape

    out = {}
    for g in model.head.groups:
        for s in g["streams"]:
            shape = tuple(g["shape"]) if g["kind"] != "handcrafted" else item_shape(s)
            out[s] = (shape, g["frames"])
    return out


def example_inputs(net: ExportableModel, model, batch: int = 2, seconds: float = 1.0, seed: int = 0) -> tuple:
    """Deterministic inputs: a speech-like wave (batch, seconds * 16 kHz), or cached streams
    (frames on each stream's grid; values as its spec's ``example`` makes them, e.g. f0 as
    voiced Hz and a periodicity)."""
    g = torch.Generator().manual_seed(seed)
    if net.wave_in:
        n = int(round(seconds * 16000))
        t = torch.arange(n) / 16000
        f0 = 100 + 150 * torch.rand(batch, 1, generator=g)
        harmonics = sum(torch.sin(2 * math.pi * k * f0 * t + k) / k for k in range(1, 20))
        return ((0.3 * harmonics / 2 + 0.02 * torch.randn(batch, n, generator=g)).float(),)
    samples = int(round(seconds * 16000))
    xs = []
    for s, (shape, is_frames) in _stream_shapes(model).items():
        # Frames on each stream's own grid, so streams of different lengths stay different
        # lengths in the exported graph.
        frames = _example_frames(s, samples)
        x = torch.randn(batch, *shape, *((frames,) if is_frames else ()), generator=g)
        example = spec(s).example if s in STREAMS else None
        xs.append((example(x, g) if example is not None else x).float())
    return tuple(xs)


def _example_frames(stream: str, samples: int) -> int:
    """Frames of ``stream`` for ``samples``: its own grid, or (a backbone's, none held) 100 a second."""
    grid = STREAMS[stream].grid if stream in STREAMS else None
    try:
        return grid(None, 16000)[1](samples) if grid is not None else samples // 160 + 1
    except StreamError:  # its grid is the backbone's
        return samples // 160 + 1


def dynamic_axes(net: ExportableModel, model) -> list[dict]:
    """Per input, its dynamic axes: {axis: (name, min)}; batch always, samples or frames when they vary."""
    if net.wave_in:
        return [{0: ("batch", 1), 1: ("samples", net.min_samples)}]
    out = []
    for s, (shape, is_frames) in _stream_shapes(model).items():
        axes = {0: ("batch", 1)}
        if is_frames:
            axes[1 + len(shape)] = (f"{s}_frames", 2)
        out.append(axes)
    return out
