"""ReDimNet intermediate outputs: the stem and every stage output as 1-D frames.

ReDimNet keeps a list of 1-D outputs (B, F*C, T) - the stem's, then each stage's - and
every stage (and the final aggregation) reads them through a learned softmax-weighted
sum. Those tensors are the ``layers`` stream. :func:`redimnet_layers` computes them from
outside the model by running its submodules in the order ``Backbone.forward`` does, so
the model code needs no hooks; :func:`redimnet_pooled_from_layers` finishes the forward
from them, and a test checks that it equals ``model.pooled`` exactly.
"""

from __future__ import annotations

import torch


def redimnet_layers(model, waves: torch.Tensor) -> list[torch.Tensor]:
    """Stem and stage outputs of a ReDimNet for a batch of waveforms.

    Args:
        model: a ReDimNet (mrlcache's, with ``.features`` and ``.backbone``).
        waves: (B, T) at 16 kHz.
    Returns:
        1 + number of stages tensors, each (B, F*C, T // hop + 1).
    """
    backbone = model.backbone
    outs = [backbone.stem(model.features(waves).unsqueeze(1))]
    for name in backbone.stage_names:
        stage = getattr(backbone, name)
        x = stage[0](outs)  # the stage's weighted sum over every earlier output
        for layer in stage[1:]:
            x = layer(x)
        outs.append(x)
    return outs


def redimnet_pooled_from_layers(model, outs: list[torch.Tensor]) -> torch.Tensor:
    """The rest of ``model.pooled``: final weighted sum, optional MFA, ASTP. -> (B, pooled_dim)."""
    backbone = model.backbone
    return model.pool(backbone.mfa(backbone.fin_wght1d(outs)))


def redimnet_num_layers(model) -> int:
    """Number of tensors :func:`redimnet_layers` returns (stem + stages)."""
    return 1 + len(model.backbone.stage_names)


def redimnet_layer_dim(model) -> int:
    """Width of each layer's frames, F * C."""
    cfg = model.model_config
    return cfg["F"] * cfg["C"]


def mean_std(frames: torch.Tensor) -> torch.Tensor:
    """Per-layer statistics over time: (B, L, D, T) -> (B, L, 2D) = [mean, std] (float32)."""
    x = frames.float()
    mean = x.mean(dim=-1)
    std = x.var(dim=-1, unbiased=False).clamp_min(0.0).sqrt()
    return torch.cat([mean, std], dim=-1)
