"""Log-mel front end of ReDimNet (feature type 'pt').

Waveform (B, T) at 16 kHz -> pre-emphasis -> torchaudio MelSpectrogram (Hamming window,
512-point FFT, 25 ms window, 10 ms hop, 20-7600 Hz) -> log(x + 1e-6) -> mean subtraction
over time. Module and buffer names (`torchfbank.1.flipped_filter`,
`torchfbank.2.spectrogram.window`, `torchfbank.2.mel_scale.fb`) follow the published
checkpoints, whose state_dicts carry these buffers.

Features are always computed in float32 with autocast disabled: the log of a power
spectrum loses most of its precision in bfloat16/float16, and the published models were
trained on float32 features.
"""

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
