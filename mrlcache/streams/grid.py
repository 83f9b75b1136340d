"""Kaldi's frame grid, shared by the stream registry and the fbank/MFCC/F0 modules (no imports: no cycle)."""


def kaldi_frames(num_samples: int, sample_rate: int = 16000) -> int:
    """Number of Kaldi frames (snip_edges, 25 ms every 10 ms) for ``num_samples``; 0 when shorter than a window."""
    window, shift = sample_rate * 25 // 1000, sample_rate * 10 // 1000
    return 0 if num_samples < window else 1 + (num_samples - window) // shift
