"""ReDimNet: Reshape Dimensions Network for speaker recognition.

I. Yakovlev, R. Makarov, A. Balykin, P. Malov, A. Okhotnikov, N. Torgashov,
"Reshape Dimensions Network for Speaker Recognition", Interspeech 2024, pp. 3235-3239,
doi:10.21437/Interspeech.2024-2116. Reference code: https://github.com/IDRnD/ReDimNet.

The network alternates between a 2D view [B, c, f, t] and a 1D view [B, f*c, t] of the
same tensor (f*c = F*C at every stage), so 2D convolution blocks over (frequency, time)
and 1D time-context blocks can be mixed and all 1D outputs aggregated with learned
softmax weights. Written from docs/redimnet facts so that the module and parameter
names equal those of the published checkpoints (see docs/model.md): a checkpoint's
`model_config` builds this module and its `state_dict` loads strictly.

Reads top to bottom: config, backbone, pooling, the full model with the published head,
named size configurations; the blocks (small layers, 2D blocks, 1D time-context blocks)
are in :mod:`mrlcache.backbone.blocks`.
"""

import copy

import torch
from torch import nn

from mrlcache.backbone.blocks import (
    BLOCKS_2D,
    TIME_CONTEXT,
    Block2d,
    ConfigError,
    LayerNormCF,
    TimeContextBlock,
    To1d,
    To2d,
    WeightedSum,
)
from mrlcache.backbone.features import FEATURE_PARAMS, TRAINING_ONLY_PARAMS, ExportableMelBanks, MelBanks


# --------------------------------------------------------------------------------------
# Configuration: the keyword arguments of the reference wrapper class, with its defaults.
# --------------------------------------------------------------------------------------

M_STAGES = [  # (stride, num_blocks, conv_exp, kernel_sizes, att_block_red): wrapper default
    (1, 2, 1, [(3, 3)], 12),
    (2, 2, 1, [(3, 3)], 12),
    (1, 3, 1, [(3, 3)], 12),
    (2, 4, 1, [(3, 3)], 8),
    (1, 4, 1, [(3, 3)], 8),
    (2, 4, 1, [(3, 3)], 4),
]

DEFAULT_CONFIG = {
    "F": 72,
    "C": 16,
    "block_1d_type": "att",
    "block_2d_type": "convnext_like",
    "stages_setup": M_STAGES,
    "group_divisor": 4,
    "out_channels": None,
    "embed_dim": 192,
    "num_classes": None,
    "class_dropout": 0.0,  # training only
    "feat_agg_dropout": 0.0,  # training only
    "head_activation": None,
    "hop_length": 160,
    "pooling_func": "ASTP",
    "feat_type": "pt",
    "global_context_att": False,
    "emb_bn": False,
    "spec_params": {"do_spec_aug": False, "freq_mask_width": (0, 6), "time_mask_width": (0, 8)},
    "return_all_outputs": False,  # changes only the reference's return value
    "tf_optimized_arch": False,
}


def _normalise_stage(i, stage):
    """One stages_setup entry (tuple or list) -> [stride, blocks, exp, [[kh, kw], ...], red]."""
    if not isinstance(stage, (tuple, list)) or len(stage) != 5:
        raise ConfigError(f"stages_setup[{i}] must be (stride, num_blocks, conv_exp, kernel_sizes, "
                          f"att_block_red), got {stage!r}")
    stride, blocks, exp, kernels, red = stage
    if stride not in (1, 2, 3):
        raise ConfigError(f"stages_setup[{i}]: stride must be 1, 2 or 3, got {stride!r}")
    kernels = [list(k) if isinstance(k, (tuple, list)) else k for k in kernels]
    return [int(stride), int(blocks), int(exp), kernels, None if red is None else int(red)]


def resolve_config(model_config):
    """Fill defaults, check every key and setting, return a plain-data copy.

    Args:
        model_config: dict of the reference wrapper's keyword arguments (absent keys take
            the wrapper defaults; tuples or lists accepted in stages_setup).
    Returns:
        dict with every key of DEFAULT_CONFIG; stages as lists.
    Raises:
        ConfigError: unknown keys or unsupported settings.
    """
    unknown = sorted(set(model_config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ConfigError(f"unknown model_config keys {unknown}; known keys: {sorted(DEFAULT_CONFIG)}")
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    cfg.update(copy.deepcopy(dict(model_config)))
    if cfg["feat_type"] not in ("pt", "pt_mel"):
        raise ConfigError(f"feat_type={cfg['feat_type']!r} is not supported: only the PyTorch "
                          "mel front end ('pt') is implemented")
    if cfg["tf_optimized_arch"]:
        raise ConfigError("tf_optimized_arch=True (the TensorFlow-export layout) is not supported")
    if cfg["pooling_func"] != "ASTP":
        raise ConfigError(f"pooling_func={cfg['pooling_func']!r} is not supported: only 'ASTP'")
    if cfg["head_activation"] is not None:
        raise ConfigError(f"head_activation={cfg['head_activation']!r} is not supported (only None)")
    if cfg["block_2d_type"] not in BLOCKS_2D:
        raise ConfigError(f"block_2d_type={cfg['block_2d_type']!r}; known: {sorted(BLOCKS_2D)}")
    if cfg["block_1d_type"] not in TIME_CONTEXT:
        raise ConfigError(f"block_1d_type={cfg['block_1d_type']!r}; known: {sorted(TIME_CONTEXT)}")
    spec = dict(cfg["spec_params"] or {})
    bad = sorted(set(spec) - set(TRAINING_ONLY_PARAMS) - set(FEATURE_PARAMS))
    if bad:
        raise ConfigError(f"unknown spec_params keys {bad}")
    cfg["spec_params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}
    cfg["stages_setup"] = [_normalise_stage(i, s) for i, s in enumerate(cfg["stages_setup"])]
    f = cfg["F"]
    for i, (stride, *_rest) in enumerate(cfg["stages_setup"]):
        if f % stride:
            raise ConfigError(f"stages_setup[{i}]: {f} frequency bins are not divisible by stride {stride}")
        f //= stride
    return cfg


# --------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """Log-mel (B, F, T) -> frame features (B, out_channels or F*C, T)."""

    def __init__(self, cfg):
        super().__init__()
        F_, C = cfg["F"], cfg["C"]
        width = F_ * C  # the 1D width, constant across stages
        gd = cfg["group_divisor"]
        make_2d = BLOCKS_2D[cfg["block_2d_type"]]
        relu = "relu" in cfg["block_1d_type"] and "relu" in cfg["block_2d_type"]

        self.stem = nn.Sequential(nn.Conv2d(1, C, 3, padding="same"), LayerNormCF(C), To1d())
        self.stage_names = []
        c, f = C, F_
        for i, (stride, num_blocks, exp, _kernels, att_red) in enumerate(cfg["stages_setup"]):
            layers = [
                WeightedSum(i + 1, width),
                To2d(f, c),
                # Trade frequency resolution for channels; expand by conv_exp for the blocks.
                nn.Conv2d(c, stride * c * exp, kernel_size=(stride, 1), stride=(stride, 1)),
            ]
            c, f = stride * c, f // stride
            layers += [Block2d(make_2d(c * exp, f, gd)) for _ in range(num_blocks)]
            if exp != 1:  # squeeze the expanded channels back so that f * c == F * C again
                layers.append(nn.Sequential(
                    nn.Conv2d(c * exp, c, 3, padding="same", groups=c // gd),
                    nn.BatchNorm2d(c, eps=1e-6),
                    nn.ReLU() if relu else nn.GELU(),
                    nn.Conv2d(c, c, 1),
                ))
            layers.append(To1d())
            if att_red is not None:
                layers.append(TimeContextBlock(width, width // att_red, cfg["block_1d_type"]))
            self.add_module(f"stage{i}", nn.Sequential(*layers))
            self.stage_names.append(f"stage{i}")

        self.fin_wght1d = WeightedSum(len(self.stage_names) + 1, width)
        out = cfg["out_channels"]
        self.mfa = nn.Sequential(nn.Conv1d(width, out, 1), nn.BatchNorm1d(out)) if out else nn.Identity()

    def outputs(self, mel) -> list:
        """Log-mel (B, F, T) -> the stem's and every stage's 1D output, each (B, F*C, T)."""
        outs = [self.stem(mel.unsqueeze(1))]
        for name in self.stage_names:
            stage = getattr(self, name)
            x = stage[0](outs)  # the weighted sum takes every earlier output
            for layer in stage[1:]:
                x = layer(x)
            outs.append(x)
        return outs

    def finish(self, outs: list):
        """The outputs -> frame features: the final weighted sum, then the optional MFA."""
        return self.mfa(self.fin_wght1d(outs))

    def forward(self, mel):  # (B, F, T)
        return self.finish(self.outputs(mel))


# --------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------


class ASTP(nn.Module):
    """Attentive statistics pooling (bottleneck 128): (B, D, T) -> (B, 2D) = [mean, std]."""

    def __init__(self, in_dim, global_context_att, bottleneck=128):
        super().__init__()
        self.global_context_att = global_context_att
        self.linear1 = nn.Conv1d(in_dim * (3 if global_context_att else 1), bottleneck, 1)
        self.linear2 = nn.Conv1d(bottleneck, in_dim, 1)

    def forward(self, x):  # (B, D, T)
        if self.global_context_att:  # let the attention see utterance-level statistics
            mean = x.mean(dim=-1, keepdim=True).expand_as(x)
            std = torch.sqrt(x.var(dim=-1, keepdim=True) + 1e-7).expand_as(x)
            a = torch.cat([x, mean, std], dim=1)  # (B, 3D, T)
        else:
            a = x
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(a))), dim=2)  # (B, D, T)
        mean = (alpha * x).sum(dim=2)  # (B, D)
        var = (alpha * x.pow(2)).sum(dim=2) - mean.pow(2)
        return torch.cat([mean, torch.sqrt(var.clamp(min=1e-7))], dim=1)  # (B, 2D)


# --------------------------------------------------------------------------------------
# Full model
# --------------------------------------------------------------------------------------


def min_samples(config: dict) -> int:
    """Shortest wave (samples) ReDimNet takes: its mel front end pads n_fft / 2 samples a side
    by reflection, which needs a longer wave (257 for the published 512-point FFT)."""
    return dict(resolve_config(config)["spec_params"]).get("n_fft", 512) // 2 + 1


class ReDimNet(nn.Module):
    """ReDimNet with its mel front end, ASTP pooling and the published embedding head.

    Args:
        model_config: the checkpoint's model_config (see resolve_config).
    Attributes:
        model_config: the resolved config (every key, plain data).
        pooled_dim: size of the ASTP vector, 2 * (out_channels or F*C).
        embed_dim: size of the published embedding.
        min_samples: the shortest wave it takes.
        weights_sha256: SHA-256 of the weights file (set by loading/saving), else None.
    """

    def __init__(self, model_config):
        super().__init__()
        cfg = resolve_config(model_config)
        self.model_config = cfg
        self.backbone = Backbone(cfg)
        spec = {k: v for k, v in cfg["spec_params"].items() if k in FEATURE_PARAMS}
        self.spec = MelBanks(n_mels=cfg["F"], hop_length=cfg["hop_length"], **spec)
        frame_dim = cfg["out_channels"] or cfg["F"] * cfg["C"]
        self.pool = ASTP(frame_dim, cfg["global_context_att"])
        self.pooled_dim = 2 * frame_dim
        self.embed_dim = cfg["embed_dim"]
        self.min_samples = min_samples(cfg)
        self.bn = nn.BatchNorm1d(self.pooled_dim)
        self.linear = nn.Linear(self.pooled_dim, self.embed_dim)
        self.bn2 = nn.BatchNorm1d(self.embed_dim) if cfg["emb_bn"] else None
        if cfg["num_classes"] is not None:
            # Kept only so that such checkpoints load strictly; forward stops at the embedding.
            self.cls_head = nn.Sequential(nn.ReLU(), nn.Dropout(0.0), nn.Linear(self.embed_dim, cfg["num_classes"]),
                                          nn.Identity())
        self.weights_sha256 = None

    def features(self, wave):
        """Waveform (B, T) or (B, 1, T) at 16 kHz -> log-mel (B, F, T') float32, T' = T // hop + 1."""
        return self.spec(wave)

    def frames(self, wave):
        """Waveform -> backbone output frames (B, out_channels or F*C, T')."""
        return self.backbone(self.features(wave))

    def pooled(self, wave):
        """Waveform -> ASTP vector (B, pooled_dim): what mrlcache caches."""
        return self.pool(self.frames(wave))

    # The ``layers`` stream (mrlcache.streams): the stem's and every stage's 1D output, the
    # tensors every stage and the final aggregation read through learned weighted sums.
    @property
    def layer_dims(self) -> tuple:
        return (self.model_config["F"] * self.model_config["C"],) * (1 + len(self.backbone.stage_names))

    @property
    def layer_hop(self) -> int:
        """Samples per layer frame; frames are centred on multiples of it (T // hop + 1)."""
        return int(self.model_config["hop_length"])

    @property
    def layer_rate(self) -> float:
        return 16000 / self.layer_hop

    def layer_frames(self, num_samples: int) -> int:
        return num_samples // self.layer_hop + 1

    def layer_outputs(self, wave) -> list:
        """Waveform (B, T) -> 1 + stages tensors (B, F*C, T // hop + 1)."""
        return self.backbone.outputs(self.features(wave))

    def pooled_from_layers(self, outs: list):
        """The rest of :meth:`pooled` from :meth:`layer_outputs`: (B, pooled_dim), the same values."""
        return self.pool(self.backbone.finish(outs))

    def exportable(self) -> "ExportableReDimNet":
        """A copy whose front end exports (:class:`ExportableReDimNet`)."""
        return ExportableReDimNet(self)

    def head(self, pooled):
        """ASTP vector (B, pooled_dim) -> published embedding (B, embed_dim)."""
        x = self.linear(self.bn(pooled))
        return self.bn2(x) if self.bn2 is not None else x

    def forward(self, wave):
        """Waveform -> published embedding (B, embed_dim)."""
        return self.head(self.pooled(wave))

    def for_inference(self):
        """A frozen copy laid out for fast inference (BatchNorm folded, time-major, channels-last).

        Same outputs to about 1e-6 (tests/backbone/test_inference.py); this model, its
        state_dict and its SHA-256 are unchanged. Eval mode only; see
        :mod:`mrlcache.backbone.inference`.
        """
        from mrlcache.backbone.inference import InferenceReDimNet

        return InferenceReDimNet(self)


class ExportableReDimNet(nn.Module):
    """A ReDimNet's ``pooled`` and ``layer_outputs`` behind :class:`ExportableMelBanks`
    (torchaudio's STFT does not export to ONNX with a dynamic batch): the same values.

    ``min_samples``: the shortest wave the exported graph takes (its reflection padding).
    """

    def __init__(self, model: ReDimNet):
        super().__init__()
        self.frontend = ExportableMelBanks(model.spec)
        self.backbone = copy.deepcopy(model.backbone)
        self.pool = copy.deepcopy(model.pool)
        self.min_samples = self.frontend.pad + 2

    def layer_outputs(self, wave):
        return self.backbone.outputs(self.frontend(wave))

    def pooled(self, wave):
        return self.pool(self.backbone(self.frontend(wave)))


# --------------------------------------------------------------------------------------
# Named configurations (published sizes; a checkpoint's own model_config always wins)
# --------------------------------------------------------------------------------------


def _sized(F, C, block_2d, group_divisor, stages):
    """Config of a published b-size: stages given as (stride, blocks, exp, att_red)."""
    return {
        "F": F, "C": C, "block_1d_type": "conv+att", "block_2d_type": block_2d,
        "group_divisor": group_divisor, "out_channels": None, "embed_dim": 192,
        "global_context_att": True, "hop_length": 160, "pooling_func": "ASTP", "feat_type": "pt",
        "stages_setup": [(s, n, e, [(3, 3)], r) for s, n, e, r in stages],
    }


_B4_STAGES = [(1, 4, 2, 48), (2, 4, 2, 48), (1, 6, 2, 48), (2, 6, 1, 32), (1, 8, 1, 24), (2, 4, 1, 16)]

# S and M are published only as checkpoints trained on VoxBlink2 whose configurations are
# not in the reference code: load them from a file (or a download), whose config is used.
CONFIGS = {
    "b0": _sized(60, 10, "basic_resnet", 1,
                 [(1, 2, 1, 30), (2, 3, 2, 30), (1, 3, 3, 30), (2, 4, 2, 10), (1, 3, 1, 10)]),
    "b1": _sized(72, 12, "convnext_like", 8,
                 [(1, 2, 1, None), (2, 3, 1, None), (3, 4, 1, 12), (2, 5, 1, 12), (2, 3, 1, 8)]),
    "b2": _sized(72, 16, "convnext_like", 4,
                 [(1, 2, 1, 12), (2, 2, 1, 12), (1, 3, 1, 12), (2, 4, 1, 8), (1, 4, 1, 8), (2, 4, 1, 4)]),
    "b3": _sized(72, 16, "basic_resnet_fwse", 1,
                 [(1, 6, 4, 32), (2, 6, 2, 32), (1, 8, 2, 32), (2, 10, 2, 16), (1, 10, 1, 16), (2, 8, 1, 16)]),
    "b4": _sized(72, 32, "basic_resnet_fwse", 1, _B4_STAGES),
    "b5": _sized(72, 32, "basic_resnet_fwse", 16, _B4_STAGES),
    "b6": _sized(72, 32, "basic_resnet", 32,
                 [(1, 4, 4, 32), (2, 6, 2, 32), (1, 6, 2, 24), (3, 8, 1, 24), (1, 8, 1, 16), (2, 8, 1, 16)]),
}
