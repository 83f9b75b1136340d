"""ECAPA-TDNN as SpeechBrain publishes it (``speechbrain/spkrec-ecapa-voxceleb``).

B. Desplanques, J. Thienpondt, K. Demuynck, "ECAPA-TDNN: Emphasized Channel Attention,
Propagation and Aggregation in TDNN Based Speaker Verification", Interspeech 2020,
pp. 3830-3834, doi:10.21437/Interspeech.2020-2650. Reference code: SpeechBrain
(``speechbrain/lobes/models/ECAPA_TDNN.py``, ``speechbrain/lobes/features.py``).

Written from that design so that module and parameter names equal those of SpeechBrain's
``embedding_model.ckpt`` (a plain state dict, e.g. ``blocks.0.conv.conv.weight``), which
loads strictly. What the published model computes, and this module with it:

- front end: 80 log-mel energies in dB (25 ms Hamming window, 10 ms hop, 400-point FFT,
  zero-padded centred frames, triangular filters 0-8 kHz, floor 80 dB below the
  utterance's maximum), minus their mean over time (no variance normalisation);
- a TDNN layer, three SE-Res2Net blocks (reflect-padded dilated convolutions), their
  outputs concatenated into one 1x1 TDNN (multi-layer feature aggregation: the frames);
- attentive statistics pooling with global context: [mean, std] (B, 2 * channels[-1]),
  the ``pooled`` vector mrlcache caches, before the BatchNorm of the embedding layer;
- the embedding layer: BatchNorm then a 1x1 convolution to ``lin_neurons`` (192).

The front end uses only operations that export (framing by unfold, rfft), so the same
module runs in PyTorch, TorchScript and ONNX.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mrlcache.backbone.registry import exportable_copy
from mrlcache.backbone.speechbrain_yaml import HyperparamsError, read_hyperparams

NAME = "ecapa-tdnn"
WEIGHTS_FILE = "embedding_model.ckpt"
HYPERPARAMS_FILE = "hyperparams.yaml"

# Config keys the weights' shapes do not tell: a file mrlcache wrote carries them in its model_config.
UNSHAPED = ("dilations", "hop_length")

DEFAULT_CONFIG = {
    "input_size": 80,
    "channels": [512, 512, 512, 512, 1536],
    "kernel_sizes": [5, 3, 3, 3, 1],
    "dilations": [1, 2, 3, 4, 1],
    "attention_channels": 128,
    "res2net_scale": 8,
    "se_channels": 128,
    "global_context": True,
    "lin_neurons": 192,
    "hop_length": 160,  # the front end's hop (10 ms); fixed
}

# Named configurations (random weights for tests and benchmarks; a file's own shapes win).
CONFIGS = {
    "c1024": {**DEFAULT_CONFIG, "channels": [1024, 1024, 1024, 1024, 3072]},  # spkrec-ecapa-voxceleb
    "c512": dict(DEFAULT_CONFIG),  # the paper's small model
}


class ConfigError(ValueError):
    """An ECAPA-TDNN configuration that is not supported."""


def resolve_config(config: dict) -> dict:
    """Defaults filled in, every key and list length checked; a plain-data copy."""
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ConfigError(f"unknown ECAPA-TDNN config keys {unknown}; known keys: {sorted(DEFAULT_CONFIG)}")
    cfg = {**DEFAULT_CONFIG, **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    n = len(cfg["channels"])
    if n < 3 or len(cfg["kernel_sizes"]) != n or len(cfg["dilations"]) != n:
        raise ConfigError(f"channels, kernel_sizes and dilations must have the same length (at least 3), got "
                          f"{cfg['channels']}, {cfg['kernel_sizes']}, {cfg['dilations']}")
    if any(c % cfg["res2net_scale"] for c in cfg["channels"][1:-1]):
        raise ConfigError(f"res2net_scale {cfg['res2net_scale']} must divide the block channels {cfg['channels'][1:-1]}")
    for key in ("channels", "kernel_sizes", "dilations"):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in cfg[key]):
            raise ConfigError(f"{key} must be whole numbers >= 1, got {cfg[key]}")
    if cfg["hop_length"] != 160:
        raise ConfigError("hop_length is the front end's 10 ms hop: only 160 is supported")
    return cfg


# --------------------------------------------------------------------------------------
# Front end: SpeechBrain's Fbank(n_mels) and sentence mean normalisation
# --------------------------------------------------------------------------------------


def speechbrain_mel_matrix(n_mels: int, n_fft: int = 400, sample_rate: int = 16000) -> torch.Tensor:
    """Triangular mel filters (n_fft // 2 + 1, n_mels), float32, built as SpeechBrain builds them.

    Centres equally spaced in mel between 0 Hz and Nyquist; each triangle's half-width on
    both sides is the distance from the previous centre (so filters are symmetric in Hz).
    Computed in float32 like the reference, so the matrix is the same to the last bit.
    """
    to_mel = lambda hz: 2595 * math.log10(1 + hz / 700)  # noqa: E731
    mel = torch.linspace(to_mel(0), to_mel(sample_rate / 2), n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    band = (hz[1:] - hz[:-1])[:-1, None]  # (n_mels, 1)
    centre = hz[1:-1, None]
    freqs = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1)[None, :]  # (1, K)
    slope = (freqs - centre) / band  # (n_mels, K)
    return torch.clamp(torch.minimum(slope + 1.0, -slope + 1.0), min=0.0).T.contiguous()


class Fbank(nn.Module):
    """Waveform (B, T) at 16 kHz -> log-mel in dB (B, n_mels, T // 160 + 1), then mean-normalised.

    ``fbank(wave)`` is SpeechBrain's ``Fbank(n_mels)`` output (transposed to channels
    first); ``forward`` subtracts its mean over time (``InputNormalization`` 'sentence'
    without std). Always float32 with autocast off.
    """

    def __init__(self, n_mels: int = 80, n_fft: int = 400, hop: int = 160, top_db: float = 80.0):
        super().__init__()
        self.n_fft, self.hop, self.top_db = n_fft, hop, top_db
        self.register_buffer("window", torch.hamming_window(n_fft), persistent=False)  # periodic, as torch.stft's
        self.register_buffer("mel", speechbrain_mel_matrix(n_mels, n_fft), persistent=False)  # (K, n_mels)

    def fbank(self, wave: torch.Tensor) -> torch.Tensor:
        wave = _as_batch(wave)
        with torch.autocast(device_type=wave.device.type, enabled=False):
            x = F.pad(wave.float(), (self.n_fft // 2, self.n_fft // 2))  # centred frames, zero padding
            frames = x.unfold(-1, self.n_fft, self.hop) * self.window  # (B, T', n_fft)
            spec = torch.fft.rfft(frames, dim=-1)
            power = spec.real.pow(2) + spec.imag.pow(2)  # (B, T', K)
            db = 10.0 * torch.log10(torch.clamp(power @ self.mel, min=1e-10))  # (B, T', n_mels)
            floor = db.amax(dim=(-2, -1), keepdim=True) - self.top_db  # per utterance
            return torch.maximum(db, floor).transpose(1, 2)  # (B, n_mels, T')

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.fbank(wave)
        return x - x.mean(dim=-1, keepdim=True)


def _as_batch(wave: torch.Tensor) -> torch.Tensor:
    if wave.ndim == 3 and wave.shape[1] == 1:
        wave = wave[:, 0]
    if wave.ndim != 2:
        raise ValueError(f"expected a waveform of shape (B, T) or (B, 1, T), got {tuple(wave.shape)}")
    return wave


# --------------------------------------------------------------------------------------
# Blocks (names follow SpeechBrain's wrappers: conv.conv, norm.norm)
# --------------------------------------------------------------------------------------


class Conv(nn.Module):
    """1D convolution with SpeechBrain's 'same' padding: reflect, dilation * (k - 1) // 2 a side."""

    def __init__(self, cin, cout, kernel, dilation=1):
        super().__init__()
        self.pad = dilation * (kernel - 1) // 2
        self.conv = nn.Conv1d(cin, cout, kernel, dilation=dilation)

    def forward(self, x):  # (B, C, T)
        return self.conv(F.pad(x, (self.pad, self.pad), mode="reflect") if self.pad else x)


class Norm(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, x):
        return self.norm(x)


class TDNN(nn.Module):
    """Convolution, ReLU, BatchNorm (in that order)."""

    def __init__(self, cin, cout, kernel, dilation=1):
        super().__init__()
        self.conv = Conv(cin, cout, kernel, dilation)
        self.norm = Norm(cout)

    def forward(self, x):
        return self.norm(torch.relu(self.conv(x)))


class Res2Net(nn.Module):
    """Split channels into ``scale`` groups; group i > 0 adds the previous group's output first."""

    def __init__(self, channels, scale, kernel, dilation):
        super().__init__()
        self.scale = scale
        self.blocks = nn.ModuleList(TDNN(channels // scale, channels // scale, kernel, dilation)
                                    for _ in range(scale - 1))

    def forward(self, x):
        out, y = [], None
        for i, part in enumerate(torch.chunk(x, self.scale, dim=1)):
            y = part if i == 0 else self.blocks[i - 1](part if i == 1 else part + y)
            out.append(y)
        return torch.cat(out, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels, se_channels):
        super().__init__()
        self.conv1 = Conv(channels, se_channels, 1)
        self.conv2 = Conv(se_channels, channels, 1)

    def forward(self, x):
        s = x.sum(dim=2, keepdim=True) / x.shape[-1]  # the reference's masked mean with full lengths
        return torch.sigmoid(self.conv2(torch.relu(self.conv1(s)))) * x


class SERes2NetBlock(nn.Module):
    def __init__(self, cin, cout, scale, se_channels, kernel, dilation):
        super().__init__()
        self.tdnn1 = TDNN(cin, cout, 1)
        self.res2net_block = Res2Net(cout, scale, kernel, dilation)
        self.tdnn2 = TDNN(cout, cout, 1)
        self.se_block = SqueezeExcite(cout, se_channels)
        self.shortcut = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        residual = self.shortcut(x) if self.shortcut is not None else x
        return self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x)))) + residual


def _stats(x, weights, eps=1e-12):
    """Weighted mean and std over time (weights sum to 1 over T): (B, C, T) -> two (B, C)."""
    mean = (weights * x).sum(dim=2)
    std = torch.sqrt((weights * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2).clamp(eps))
    return mean, std


class AttentiveStatsPool(nn.Module):
    """Channel-wise attentive statistics with global context: (B, C, T) -> (B, 2C) = [mean, std]."""

    def __init__(self, channels, attention_channels, global_context):
        super().__init__()
        self.global_context = global_context
        self.tdnn = TDNN(channels * (3 if global_context else 1), attention_channels, 1)
        self.conv = Conv(attention_channels, channels, 1)

    def forward(self, x):
        t = x.shape[-1]
        attn = x
        if self.global_context:  # let the attention see the utterance's own statistics
            mean, std = _stats(x, torch.full_like(x[:1, :1, :], 1.0) / t)
            attn = torch.cat([x, mean.unsqueeze(2).expand_as(x), std.unsqueeze(2).expand_as(x)], dim=1)
        weights = torch.softmax(self.conv(torch.tanh(self.tdnn(attn))), dim=2)
        return torch.cat(_stats(x, weights), dim=1)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class ECAPATDNN(nn.Module):
    """ECAPA-TDNN with its front end, attentive pooling and the published embedding layer.

    Args:
        config: see DEFAULT_CONFIG (SpeechBrain's ECAPA_TDNN arguments, ReLU, no groups).
    Attributes:
        encoder: "ecapa-tdnn"; model_config: the resolved config; pooled_dim: 2 * channels[-1];
        embed_dim: lin_neurons; min_samples: the shortest wave it takes; weights_sha256: of the weights file (set by loading), else None.
    """

    encoder = NAME

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_config(config)
        self.model_config = cfg
        ch, ks, dil = cfg["channels"], cfg["kernel_sizes"], cfg["dilations"]
        self.spec = Fbank(cfg["input_size"])
        self.blocks = nn.ModuleList([TDNN(cfg["input_size"], ch[0], ks[0], dil[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(SERes2NetBlock(ch[i - 1], ch[i], cfg["res2net_scale"], cfg["se_channels"], ks[i], dil[i]))
        self.mfa = TDNN(sum(ch[1:-1]), ch[-1], ks[-1], dil[-1])
        self.asp = AttentiveStatsPool(ch[-1], cfg["attention_channels"], cfg["global_context"])
        self.pooled_dim = 2 * ch[-1]
        self.embed_dim = cfg["lin_neurons"]
        self.min_samples = min_samples(cfg)
        self.asp_bn = Norm(self.pooled_dim)
        self.fc = Conv(self.pooled_dim, self.embed_dim, 1)
        self.weights_sha256 = None

    def features(self, wave):
        """Waveform (B, T) at 16 kHz -> mean-normalised log-mel (B, n_mels, T // 160 + 1), float32."""
        return self.spec(wave)

    # The ``layers`` stream (mrlcache.streams): the TDNN layer's and each SE-Res2Net block's
    # output, C frames every 10 ms; the multi-layer aggregation reads blocks 1.. of them.
    layer_hop, layer_rate = 160, 100.0  # frames centred every 10 ms: T // 160 + 1

    @property
    def layer_dims(self) -> tuple:
        return tuple(self.model_config["channels"][:-1])

    def layer_frames(self, num_samples: int) -> int:
        return num_samples // self.layer_hop + 1

    def layer_outputs(self, wave) -> list[torch.Tensor]:
        """The TDNN layer's and each SE-Res2Net block's output, each (B, C, T // 160 + 1)."""
        x, outs = self.features(wave), []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs

    def pooled_from_layers(self, outs: list[torch.Tensor]):
        """The rest of :meth:`pooled` from :meth:`layer_outputs`: aggregation of blocks 1.., ASP."""
        return self.asp(self.mfa(torch.cat(outs[1:], dim=1)))

    def frames(self, wave):
        """Waveform -> aggregated frames (B, channels[-1], T)."""
        return self.mfa(torch.cat(self.layer_outputs(wave)[1:], dim=1))

    def pooled(self, wave):
        """Waveform -> attentive [mean, std] (B, pooled_dim): what mrlcache caches."""
        return self.asp(self.frames(wave))

    def exportable(self):
        """A copy for export (its front end exports): see :func:`~mrlcache.backbone.registry.exportable_copy`."""
        return exportable_copy(self)

    def head(self, pooled):
        """Pooled (B, pooled_dim) -> published embedding (B, embed_dim)."""
        return self.fc(self.asp_bn(pooled.unsqueeze(-1))).squeeze(-1)

    def forward(self, wave):
        return self.head(self.pooled(wave))


def min_samples(config: dict) -> int:
    """Shortest wave (samples) the encoder takes: every reflect-padded convolution needs more
    frames (one per 160-sample hop, plus one) than its padding, dilation * (kernel - 1) // 2."""
    cfg = resolve_config(config)
    pad = max(d * (k - 1) // 2 for k, d in zip(cfg["kernel_sizes"], cfg["dilations"]))
    return max(1, cfg["hop_length"] * pad)


def build(config: dict) -> ECAPATDNN:
    return ECAPATDNN(config)


# --------------------------------------------------------------------------------------
# Published files: a SpeechBrain folder (hyperparams.yaml + embedding_model.ckpt) or the ckpt
# --------------------------------------------------------------------------------------


def recognises(state: dict) -> bool:
    """True for a state dict in SpeechBrain's ECAPA_TDNN layout."""
    return "blocks.0.conv.conv.weight" in state and "asp.tdnn.conv.conv.weight" in state


def config_from_state(state: dict, dilations=None) -> dict:
    """The architecture read from the weights' shapes (dilations are not in the shapes: given,
    else SpeechBrain's default [1, 2, 3, 4, 1])."""
    try:
        n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        first = state["blocks.0.conv.conv.weight"]  # (C0, n_mels, k0)
        channels = [first.shape[0]] + [state[f"blocks.{i}.tdnn1.conv.conv.weight"].shape[0] for i in range(1, n_blocks)]
        kernels = [first.shape[-1]] + [state[f"blocks.{i}.res2net_block.blocks.0.conv.conv.weight"].shape[-1]
                                       for i in range(1, n_blocks)]
        scale = 1 + len({k.split(".")[4] for k in state if k.startswith("blocks.1.res2net_block.blocks.")})
        mfa, att = state["mfa.conv.conv.weight"], state["asp.tdnn.conv.conv.weight"]
        cfg = {
            "input_size": first.shape[1],
            "channels": channels + [mfa.shape[0]],
            "kernel_sizes": kernels + [mfa.shape[-1]],
            "attention_channels": att.shape[0],
            "res2net_scale": scale,
            "se_channels": state["blocks.1.se_block.conv1.conv.weight"].shape[0],
            "global_context": att.shape[1] == 3 * mfa.shape[0],
            "lin_neurons": state["fc.conv.weight"].shape[0],
        }
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise ConfigError(f"not an ECAPA-TDNN state dict in SpeechBrain's layout (cannot read {err})") from None
    cfg["dilations"] = list(dilations) if dilations is not None else [1, 2, 3, 4, 1][:len(cfg["channels"])]
    return {k: int(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in cfg.items()}


def weights_file(path) -> Path:
    """The weights file of a SpeechBrain model folder (or the file itself)."""
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def from_published(state: dict, path) -> tuple[dict, dict]:
    """SpeechBrain's embedding_model state dict -> (config, the same state dict).

    The architecture comes from the weights' shapes; a hyperparams.yaml beside the weights
    file adds the dilations and must agree with the shapes.

    Raises:
        ConfigError: not this layout, or a hyperparams.yaml that disagrees or asks for more.
    """
    hyper = Path(path).parent / HYPERPARAMS_FILE
    if hyper.exists() and not hyper.is_file():
        raise ConfigError(f"{hyper}: not a regular file; remove it or put SpeechBrain's hyperparams.yaml there")
    try:
        declared = read_hyperparams(hyper) if hyper.is_file() else {}
    except HyperparamsError as err:
        raise ConfigError(str(err)) from None
    cfg = config_from_state(state, declared.get("dilations"))
    differ = {k: (v, cfg[k]) for k, v in declared.items() if k in cfg and k != "dilations"
              and (list(v) if isinstance(v, (list, tuple)) else v) != cfg[k]}
    if differ:
        raise ConfigError(f"{hyper} disagrees with the weights' shapes: "
                          + ", ".join(f"{k} {a} (weights: {b})" for k, (a, b) in differ.items()))
    return cfg, state
