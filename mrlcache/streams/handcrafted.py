"""Kaldi-compatible log-mel filterbank energies and MFCCs (torchaudio.compliance.kaldi).

Both use Kaldi's framing: 25 ms windows every 10 ms with ``snip_edges`` (frame ``i``
covers samples ``[160 i, 160 i + 400)`` at 16 kHz, so ``1 + (T - 400) // 160`` frames),
a Povey window, pre-emphasis 0.97, DC removal per frame and no dither (deterministic).
The waveform is used at the scale it is given (float in [-1, 1] from mrlcache.audio);
Kaldi's own tools read int16 samples, whose log energies are these plus log(32768^2).
"""

from __future__ import annotations

import torch
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
