"""Kaldi-compatible log-mel filterbank energies and MFCCs (torchaudio.compliance.kaldi).

Both use Kaldi's framing: 25 ms windows every 10 ms with ``snip_edges`` (frame ``i``
covers samples ``[160 i, 160 i + 400)`` at 16 kHz, so ``1 + (T - 400) // 160`` frames),
a Povey window, pre-emphasis 0.97, DC removal per frame and no dither (deterministic).
The waveform is used at the scale it is given (float in [-1, 1] from mrlcache.audio);
Kaldi's own tools read int16 samples, whose log energies are these plus log(32768^2).

torchaudio's Kaldi features (``torch.fft.rfft``, one utterance per call) do not export to
ONNX with a dynamic batch: :class:`ExportableKaldi` computes the same numbers with the DFT
as a fixed matrix product whose kernels are the window times cos / sin.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchaudio.compliance import kaldi

from mrlcache.streams.grid import kaldi_frames

FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
NUM_MEL_BINS = 80
NUM_CEPS = 40


def _per_utterance(fn, waves: torch.Tensor, sample_rate: int, **kwargs) -> torch.Tensor:
    if waves.ndim != 2:
        raise ValueError(f"expected waveforms of shape (B, T), got {tuple(waves.shape)}")
    if kaldi_frames(waves.shape[1], sample_rate) == 0:
        raise ValueError(f"waveforms of {waves.shape[1]} samples are shorter than one "
                         f"{FRAME_LENGTH_MS:g} ms frame at {sample_rate} Hz")
    # kaldi.* take one (channels, T) waveform: one call per utterance, in float32.
    with torch.no_grad(), torch.autocast(device_type=waves.device.type, enabled=False):
        out = [fn(w[None].float(), sample_frequency=sample_rate, frame_length=FRAME_LENGTH_MS,
                  frame_shift=FRAME_SHIFT_MS, dither=0.0, **kwargs) for w in waves]
    return torch.stack(out).transpose(1, 2).contiguous()  # (B, D, frames)


def fbank(waves: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """80 log-mel filterbank energies: (B, T) -> (B, 80, 1 + (T - 400) // 160), float32."""
    return _per_utterance(kaldi.fbank, waves, sample_rate, num_mel_bins=NUM_MEL_BINS)


def mfcc(waves: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """40 MFCCs from 40 mel bands (all cepstra kept): (B, T) -> (B, 40, frames), float32."""
    return _per_utterance(kaldi.mfcc, waves, sample_rate, num_ceps=NUM_CEPS, num_mel_bins=NUM_CEPS)


class ExportableKaldi(nn.Module):
    """:func:`fbank` or :func:`mfcc` from exportable operations, batched.

    Args: kind: ``fbank`` (80 log-mel energies) or ``mfcc`` (40 cepstra from 40 bands).
    (B, T) float32 at 16 kHz, T >= 400 -> (B, 80 or 40, 1 + (T - 400) // 160): 25 ms Povey
    windows every 10 ms (snip edges), DC removed per frame, pre-emphasis 0.97 (the first
    sample of a frame repeated), a 512-point power spectrum, no dither.
    """

    def __init__(self, kind: str):
        super().__init__()
        from torchaudio.functional import create_dct

        if kind not in ("fbank", "mfcc"):
            raise ValueError(f"no exportable Kaldi front end for {kind!r}")
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
