"""Log-mel front end of ReDimNet (feature type 'pt').

Waveform (B, T) at 16 kHz -> pre-emphasis -> torchaudio MelSpectrogram (Hamming window,
512-point FFT, 25 ms window, 10 ms hop, 20-7600 Hz) -> log(x + 1e-6) -> mean subtraction
over time. Module and buffer names (`torchfbank.1.flipped_filter`,
`torchfbank.2.spectrogram.window`, `torchfbank.2.mel_scale.fb`) follow the published
checkpoints, whose state_dicts carry these buffers.

Features are always computed in float32 with autocast disabled: the log of a power
spectrum loses most of its precision in bfloat16/float16, and the published models were
trained on float32 features.

:class:`ExportableMelBanks` computes the same features from operations every exporter
knows (torchaudio's STFT with reflect padding does not export to ONNX with a dynamic
batch): slices, a constant reversing gather, the DFT as a fixed matrix product whose
kernels are the window times cos / sin, the same mel matrix, log and normalisation.
"""

import math

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

# spec_params keys that only matter for training-time SpecAugment; inference ignores them.
TRAINING_ONLY_PARAMS = ("do_spec_aug", "freq_mask_width", "time_mask_width", "freq_start_bin", "num_apply_spec_aug")
# spec_params keys that change the features; everything else is rejected by the model config check.
FEATURE_PARAMS = ("sample_rate", "n_fft", "win_length", "f_min", "f_max", "norm_signal", "do_preemph", "spec_norm")


class NormalizeAudio(nn.Module):
    """Per-utterance zero mean, unit variance of the waveform (off in published models)."""

    def forward(self, x):  # (B, T)
        return (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True, unbiased=False) + 1e-6)


class PreEmphasis(nn.Module):
    """y[t] = x[t] - 0.97 x[t-1], with the first sample reflected so the length is kept."""

    def __init__(self, coef=0.97):
        super().__init__()
        self.register_buffer("flipped_filter", torch.tensor([[[-coef, 1.0]]]))  # (1, 1, 2)

    def forward(self, x):  # (B, T)
        x = F.pad(x.unsqueeze(1), (1, 0), mode="reflect")  # (B, 1, T + 1)
        return F.conv1d(x, self.flipped_filter).squeeze(1)  # (B, T)


class MelBanks(nn.Module):
    """Log-mel features with mean normalisation over time.

    Args:
        n_mels: number of mel bands (the model's F).
        hop_length: hop in samples (160 = 10 ms).
        sample_rate, n_fft, win_length, f_min, f_max: MelSpectrogram settings.
        norm_signal: normalise the waveform first; do_preemph: apply pre-emphasis.
        spec_norm: 'mn' (subtract the mean over time) or 'mvn' (also divide by the std).
    """

    def __init__(self, n_mels=72, hop_length=160, sample_rate=16000, n_fft=512, win_length=400,
                 f_min=20, f_max=7600, norm_signal=False, do_preemph=True, spec_norm="mn"):
        super().__init__()
        if spec_norm not in ("mn", "mvn"):
            raise ValueError(f"spec_norm={spec_norm!r} is not supported (use 'mn' or 'mvn')")
        self.spec_norm = spec_norm
        self.torchfbank = nn.Sequential(
            NormalizeAudio() if norm_signal else nn.Identity(),
            PreEmphasis() if do_preemph else nn.Identity(),
            torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length,
                f_min=f_min, f_max=f_max, n_mels=n_mels, window_fn=torch.hamming_window),
        )

    def forward(self, wave):
        """Waveform (B, T) or (B, 1, T) -> log-mel (B, n_mels, T // hop + 1), float32."""
        if wave.ndim == 3 and wave.shape[1] == 1:
            wave = wave[:, 0]
        if wave.ndim != 2:
            raise ValueError(f"expected a waveform of shape (B, T) or (B, 1, T), got {tuple(wave.shape)}")
        # No gradient and no autocast: the front end is fixed and must stay float32.
        with torch.no_grad(), torch.autocast(device_type=wave.device.type, enabled=False):
            x = self.torchfbank(wave.float()) + 1e-6  # (B, F, T')
            x = x.log()
            mean = x.mean(dim=-1, keepdim=True)
            if self.spec_norm == "mn":
                x = x - mean
            else:
                x = (x - mean) / (x.std(dim=-1, keepdim=True) + 1e-8)
        return x


class ExportableMelBanks(nn.Module):
    """Log-mel features of MelBanks, from exportable operations.

    Args:
        melbanks: the :class:`MelBanks` of a backbone; its
            settings, window, mel matrix and pre-emphasis filter are copied.
    Input (B, T) float32 with T > win_length // 2; output (B, n_mels, T // hop + 1) float32.
    """

    def __init__(self, melbanks):
        super().__init__()
        norm, preemph, mel = melbanks.torchfbank
        spec = mel.spectrogram
        if not (spec.center and spec.pad_mode == "reflect" and spec.power == 2.0 and spec.onesided
                and not spec.normalized and spec.pad == 0):
            raise ValueError("this front end only exports a centred, reflect-padded, one-sided power spectrum")
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
