"""Export a fitted model to ONNX or TorchScript, and check an exported file against PyTorch.

ReDimNet's own front end (torchaudio's STFT with reflect padding) does not export to ONNX.
:class:`ExportableMelBanks` computes the same log-mel features from operations every
exporter knows: reflect padding built from slices and a constant reversing gather, the DFT
as one fixed strided convolution whose kernels are the window times cos / sin (the window
folded in, zero-padded samples of the window left out), the same mel matrix, log and
normalisation as :class:`~mrlcache.models.features.MelBanks`, whose buffers it reuses.

The exported file maps a wave (B, T) float32 at 16 kHz, dynamic B and T, to one output
``embedding`` (B, max(dims)): the ``d``-dimensional embedding is its first ``d`` columns
(raw, not L2-normalised, as ``MRLModel`` returns it) for every exported ``d``. One output
instead of one per dim: every prefix is in it once, and the dims are written in the file
(ONNX metadata ``mrlcache.dims``; TorchScript extra file ``mrlcache.json``). A head-only
model exports the head: input ``pooled`` (B, pooled_dim), same output.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 18
TOLERANCE = 1e-4  # largest relative error verify_export accepts


class ExportError(Exception):
    """A model, option or file that cannot be exported or verified."""


# --------------------------------------------------------------------------------------
# Front end
# --------------------------------------------------------------------------------------


class ExportableMelBanks(nn.Module):
    """Log-mel features of MelBanks, from exportable operations.

    Args:
        melbanks: the :class:`~mrlcache.models.features.MelBanks` of a backbone; its
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
        taps = preemph.flipped_filter.detach().flatten() if not isinstance(preemph, nn.Identity) else None
        self.register_buffer("preemph", taps.clone() if taps is not None else torch.zeros(0))  # (2,) = [-c, 1]
        # Reflection without flip: gather a fixed reversed index of the edge slices.
        self.register_buffer("reverse", torch.arange(self.pad - 1, -1, -1))  # (pad,)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, n_mels, T')
        x = wave.float()
        if self.norm_signal:
            x = (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True, unbiased=False) + 1e-6)
        if self.preemph.numel():
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
