"""Front ends from exportable operations: each maps a wave (B, T) to one cached stream.

ReDimNet's own front end (torchaudio's STFT with reflect padding) and torchaudio's Kaldi
features (``torch.fft.rfft``, one utterance per call) do not export to ONNX with a
dynamic batch. These compute the same numbers from operations every exporter knows:
slices, a constant reversing gather, the DFT as a fixed matrix product whose kernels are
the window times cos / sin (the window folded in), the same mel matrices, log and
normalisation:

- :class:`ExportableMelBanks`: ReDimNet's log-mel (:class:`~mrlcache.backbone.features.MelBanks`,
  whose buffers it reuses); the ``pooled`` and ``layers`` streams run the backbone after it;
- :class:`ExportableKaldi`: the ``fbank`` and ``mfcc`` streams (:mod:`mrlcache.streams.handcrafted`).

:func:`front_end` gives the module of a stream, or refuses in one line (F0: YIN's
per-frame search for the first dip below a threshold is data-dependent control flow; a
pretrained transformer's layers: its front end is not ours to rebuild).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from mrlcache.export.formats import ExportError


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
        self.min_samples = self.pad + 2

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


class ExportableKaldi(nn.Module):
    """Kaldi log-mel energies or MFCCs of :mod:`mrlcache.streams.handcrafted`, batched.

    Args: kind: ``fbank`` (80 log-mel energies) or ``mfcc`` (40 cepstra from 40 bands).
    (B, T) float32 at 16 kHz, T >= 400 -> (B, 80 or 40, 1 + (T - 400) // 160): 25 ms Povey
    windows every 10 ms (snip edges), DC removed per frame, pre-emphasis 0.97 (the first
    sample of a frame repeated), a 512-point power spectrum, no dither.
    """

    def __init__(self, kind: str):
        super().__init__()
        from torchaudio.compliance import kaldi
        from torchaudio.functional import create_dct

        from mrlcache.streams.handcrafted import FRAME_LENGTH_MS, FRAME_SHIFT_MS, NUM_CEPS, NUM_MEL_BINS

        if kind not in ("fbank", "mfcc"):
            raise ExportError(f"no exportable Kaldi front end for {kind!r}")
        self.kind = kind
        self.win, self.hop = int(16 * FRAME_LENGTH_MS), int(16 * FRAME_SHIFT_MS)  # samples at 16 kHz
        n_fft = 1 << (self.win - 1).bit_length()  # Kaldi rounds the window up to a power of two
        window = torch.hann_window(self.win, periodic=False, dtype=torch.float64).pow(0.85)  # Povey
        n = torch.arange(self.win, dtype=torch.float64)
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
        angle = 2 * math.pi * n[:, None] * k[None, :] / n_fft  # zero padding past the window adds nothing
        self.register_buffer("cos", (window[:, None] * torch.cos(angle)).float())  # (win, K)
        self.register_buffer("sin", (window[:, None] * torch.sin(angle)).float())
        bins = NUM_MEL_BINS if kind == "fbank" else NUM_CEPS
        banks, _ = kaldi.get_mel_banks(bins, n_fft, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
        self.register_buffer("mel", nn.functional.pad(banks.float(), (0, 1)).T.contiguous())  # (K, bins)
        if kind == "mfcc":
            dct = create_dct(bins, bins, "ortho")
            dct[:, 0] = math.sqrt(1 / bins)  # Kaldi's C0: a plain weighted sum
            lifter = 1.0 + 11.0 * torch.sin(math.pi * torch.arange(NUM_CEPS) / 22.0)  # cepstral lifter 22
            self.register_buffer("dct", (dct[:, :NUM_CEPS] * lifter).float())  # (bins, ceps)
        else:
            self.register_buffer("dct", torch.zeros(0))
        self.min_samples = self.win

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, D, frames)
        frames = wave.float().unfold(1, self.win, self.hop)  # (B, m, win)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - 0.97 * previous
        re, im = frames @ self.cos, frames @ self.sin
        energies = (re * re + im * im) @ self.mel  # (B, m, bins)
        x = torch.clamp_min(energies, torch.finfo(torch.float32).eps).log()
        if self.kind == "mfcc":
            x = x @ self.dct
        return x.transpose(1, 2)


class _ReDimNetStreams(nn.Module):
    """A ReDimNet behind the exportable mel front end: its ``pooled`` vector or its ``layers``."""

    def __init__(self, backbone, stream: str, layers_pooled: bool = False):
        super().__init__()
        self.frontend = ExportableMelBanks(backbone.spec)
        self.backbone = copy.deepcopy(backbone.backbone)  # redimnet_layers reads .backbone and .features
        self.pool = copy.deepcopy(backbone.pool) if stream == "pooled" else None
        self.stream, self.layers_pooled = stream, layers_pooled
        self.min_samples = self.frontend.pad + 2

    def features(self, wave):
        return self.frontend(wave)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        from mrlcache.streams.layers import mean_std, redimnet_layers

        if self.stream == "pooled":
            return self.pool(self.backbone(self.features(wave)))
        frames = torch.stack(redimnet_layers(self, wave), dim=1)  # (B, L, D, T)
        return mean_std(frames) if self.layers_pooled else frames


MIN_SAMPLES = 1600  # shortest wave an exported encoder other than ReDimNet takes (0.1 s)


class _OwnPooled(nn.Module):
    """An encoder whose own ``pooled`` exports (ECAPA-TDNN, CAM++: their front ends are written to export)."""

    def __init__(self, backbone):
        super().__init__()
        self.net = copy.deepcopy(backbone)
        self.min_samples = MIN_SAMPLES

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.net.pooled(wave)


def _exports_itself(backbone) -> bool:
    """True for encoders whose own ``pooled`` exports (every one but ReDimNet, whose STFT does not)."""
    return getattr(backbone, "encoder", "redimnet") != "redimnet"


def front_end(stream: str, backbone, layers_pooled: bool = False) -> nn.Module:
    """The exportable module computing ``stream`` from a wave, as extract computes it.

    Raises ExportError in one line naming the stream and why it cannot be exported.
    """
    from mrlcache.streams import PTM, spec

    if spec(stream).needs_backbone:
        if backbone is None:
            raise ExportError(f"stream {stream!r} needs the backbone, and this model was saved without one")
        if isinstance(backbone, PTM):
            raise ExportError(f"stream {stream!r} comes from the pretrained transformer {backbone.name}, whose "
                              "front end mrlcache does not rebuild for export; export a model on ReDimNet or "
                              "handcrafted streams")
        if _exports_itself(backbone):
            if stream != "pooled":
                raise ExportError(f"stream {stream!r} of the {backbone.encoder} encoder has no exportable front end; "
                                  "export a model on its pooled vector")
            return _OwnPooled(backbone)
        return _ReDimNetStreams(backbone, stream, layers_pooled)
    if stream in ("fbank", "mfcc"):
        return ExportableKaldi(stream)
    if stream == "f0":
        raise ExportError("stream 'f0' cannot be exported: its YIN search picks each frame's first dip below "
                          "a threshold, data-dependent control flow an exported graph cannot hold; export a "
                          "model without f0, or compute f0 yourself and run the head on cached streams")
    raise ExportError(f"stream {stream!r} has no exportable front end")
