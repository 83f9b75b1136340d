"""Training views: deterministic crops and augmentation, pure wave -> wave functions.

Every random choice comes from an explicit ``np.random.Generator``; :func:`view_rng` makes
it from a cryptographic hash of (seed, utterance id, view index), so a view is the same
in any process, on any rerun or resume, whatever the worker count. (Streams are those of
numpy's PCG64 and Generator methods; numpy documents them as stable within a version
and rarely changed across versions.)

The recipe follows the VoxCeleb x-vector/WeSpeaker practice: additive noise at a random
SNR (MUSAN-style noise files, else synthetic coloured noise), reverberation with a room
impulse response (RIR files, else synthetic exponentially decaying responses), random
gain; speed perturbation (resampling, which also shifts the pitch) is off by default
because it changes the voice (Snyder et al., "X-vectors", ICASSP 2018; Ko et al., "A
study on data augmentation of reverberant speech", ICASSP 2017).

Level policy: reverberation keeps the RMS of its input; noise is scaled against the
signal it is added to; gain then scales the view. Nothing is ever clipped: a view whose
peak would exceed 1.0 (full scale of decoded audio) is scaled down as a whole to peak
1.0, so outputs stay in [-1, 1] without clipping distortion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from mrlcache.audio import SAMPLE_RATE, AudioError, load_audio, resample
from mrlcache.corpus import AUDIO_EXTENSIONS

# Amplitude falls by 60 dB (a factor 1000 = e^6.908) over one RT60.
_LN_1000 = float(np.log(1000.0))


class AugmentError(ValueError):
    """Augmentation data (noise/RIR folders or files) that cannot be used. Distinct from
    AudioError on purpose: a bad noise file is a setup problem, not a bad utterance."""


def view_rng(seed: int, utt_id: str, view: int) -> np.random.Generator:
    """The generator of one view: PCG64 seeded with blake2b(seed, utt_id, view).

    Never uses Python's ``hash()``, which changes between runs.
    """
    key = f"{int(seed)}\x1f{utt_id}\x1f{int(view)}".encode("utf-8")
    digest = hashlib.blake2b(key, digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def random_crop(wave: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of ``n`` samples; shorter waves are repeat-padded.

    A short wave is tiled and the window starts at a random point of the first copy,
    so the output is the utterance looped, never zeros.

    Args:
        wave: (T,) with T > 0.
        n: output length.
    Returns:
        (n,) float32, a new array.
    """
    length = wave.shape[0]
    if length == 0:
        raise ValueError("cannot crop an empty wave")
    if length >= n:
        start = int(rng.integers(0, length - n + 1))
        return np.array(wave[start : start + n], dtype=np.float32)
    start = int(rng.integers(0, length))
    reps = -(-(start + n) // length)  # ceil
    return np.tile(wave, reps)[start : start + n].astype(np.float32)


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Add ``noise`` scaled so that power(wave) / power(scaled noise) is ``snr_db``.

    Both (T,); a silent ``wave`` gets no noise. Returns (T,) float32.
    """
    signal_power = float(np.mean(np.square(wave, dtype=np.float64)))
    noise_power = float(np.mean(np.square(noise, dtype=np.float64)))
    if noise_power == 0.0:
        raise ValueError("noise has zero power")
    scale = np.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (wave + scale * noise).astype(np.float32)


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with a room impulse response, keeping length, alignment and RMS level.

    The output is cut from the direct-path peak of the RIR, so the reverberant speech
    lines up with the dry speech instead of lagging by the propagation delay.

    Args:
        wave: (T,); rir: (L,).
    Returns:
        (T,) float32.
    """
    from scipy.signal import fftconvolve

    peak = int(np.argmax(np.abs(rir)))
    out = fftconvolve(wave, rir.astype(np.float32))[peak : peak + wave.shape[0]]
    power_in = float(np.mean(np.square(wave, dtype=np.float64)))
    power_out = float(np.mean(np.square(out, dtype=np.float64)))
    if power_out > 0.0:
        out = out * np.sqrt(power_in / power_out)
    return out.astype(np.float32)


def coloured_noise(n: int, slope: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1/f^slope (0 white, 1 pink, 2 brown); (n,) unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(spectrum.shape[0], dtype=np.float64)
    shaping = np.zeros_like(freqs)
    shaping[1:] = freqs[1:] ** (-slope / 2.0)  # amplitude ~ f^(-slope/2); no DC
    noise = np.fft.irfft(spectrum * shaping, n)
    return (noise / np.sqrt(np.mean(noise**2))).astype(np.float32)


def synthetic_rir(
    rt60: float, drr_db: float, rng: np.random.Generator, sr: int = SAMPLE_RATE
) -> np.ndarray:
    """A room impulse response: direct-path peak, a gap, then exponentially decaying noise.

    Args:
        rt60: seconds for the reverberant tail to decay by 60 dB.
        drr_db: direct-to-reverberant energy ratio (>= 0 keeps the direct path the peak).
    Returns:
        (round(rt60 * sr),) float32, unit energy, peak at index 0.
    """
    n = max(int(round(rt60 * sr)), 2)
    t = np.arange(n) / sr
    tail = rng.standard_normal(n) * np.exp(-_LN_1000 * t / rt60)
    # First reflections arrive 1-10 ms after the direct sound (a few metres of extra path).
    tail[: int(rng.uniform(0.001, 0.010) * sr) + 1] = 0.0
    rir = tail
    rir[0] = np.sqrt(np.sum(tail**2) * 10.0 ** (drr_db / 10.0))
    return (rir / np.sqrt(np.sum(rir**2))).astype(np.float32)


def change_speed(wave: np.ndarray, speed: float) -> np.ndarray:
    """Play ``wave`` (T,) ``speed`` times faster by resampling (tempo and pitch change
    together, as Kaldi/sox ``speed``); returns (~T / speed,) float32."""
    ratio = Fraction(speed).limit_denominator(100)
    return resample(wave, ratio.numerator, ratio.denominator)


@dataclass
class AugmentConfig:
    """Augmentation settings; stored in the cache metadata via :meth:`to_dict`.

    Ranges are (low, high) of a uniform draw. Defaults follow the VoxCeleb recipes:
    MUSAN noise at 0-15 dB SNR, reverberation on about half the views.
    """

    noise_dir: str | None = None  # MUSAN-style folder of noise files (recursive); None: synthetic
    rir_dir: str | None = None  # folder of room impulse responses (recursive); None: synthetic
    p_noise: float = 0.8
    p_reverb: float = 0.5
    snr_db: tuple[float, float] = (0.0, 15.0)
    gain_db: tuple[float, float] = (-6.0, 6.0)
    noise_slope: tuple[float, float] = (0.0, 2.0)  # synthetic noise: white .. brown
    rt60: tuple[float, float] = (0.2, 0.8)  # synthetic rooms, seconds
    drr_db: tuple[float, float] = (0.0, 10.0)  # synthetic rooms
    speed: bool = False
    speeds: tuple[float, ...] = (0.9, 1.0, 1.1)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples as lists, folders as strings)."""
        out = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "AugmentConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown augmentation setting(s): {', '.join(sorted(unknown))}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


def _list_audio(folder: str, what: str) -> list[str]:
    """Audio files below ``folder``, sorted by relative path (the same on every machine)."""
    if not os.path.isdir(folder):
        raise AugmentError(f"{folder}: {what} folder does not exist")
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(here, folder)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(AUDIO_EXTENSIONS):
                found.append(os.path.normpath(os.path.join(rel, name)))
    if not found:
        raise AugmentError(
            f"{folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in the {what} folder"
        )
    return [os.path.join(folder, r) for r in sorted(found)]


class Augmenter:
    """Applies :class:`AugmentConfig` to waves: ``augmenter(wave, rng, length) -> wave``.

    Noise and RIR files are listed once here; each use decodes one file (decoding is
    cheap next to the model, and keeps worker memory flat).
    """

    def __init__(self, config: AugmentConfig | None = None):
        self.config = config = config or AugmentConfig()
        self.noise_files = _list_audio(config.noise_dir, "noise") if config.noise_dir else []
        self.rir_files = _list_audio(config.rir_dir, "RIR") if config.rir_dir else []

    def input_samples(self, length: int) -> int:
        """Samples to crop so that at least ``length`` remain after the fastest speed."""
        if not self.config.speed:
            return length
        return int(np.ceil(length * max(self.config.speeds)))

    def __call__(
        self, wave: np.ndarray, rng: np.random.Generator, length: int | None = None
    ) -> np.ndarray:
        """Augment a wave.

        Args:
            wave: (T,) float32 at 16 kHz.
            rng: the view's generator.
            length: output samples (default T); with speed perturbation, pass a wave of
                ``input_samples(length)`` so no padding is needed.
        Returns:
            (length,) float32, finite, peak <= 1.
        """
        cfg = self.config
        length = wave.shape[0] if length is None else length
        out = wave
        if cfg.speed:
            speed = float(cfg.speeds[int(rng.integers(len(cfg.speeds)))])
            if speed != 1.0:
                out = change_speed(out, speed)
        out = random_crop(out, length, rng)
        # Reverberate first, then add noise: the noise is the room's own, not reverberated
        # speech's echo.
        if rng.random() < cfg.p_reverb:
            out = reverberate(out, self._rir(rng))
        if rng.random() < cfg.p_noise:
            out = add_noise(out, self._noise(length, rng), float(rng.uniform(*cfg.snr_db)))
        out = out * np.float32(10.0 ** (rng.uniform(*cfg.gain_db) / 20.0))
        peak = float(np.abs(out).max())
        if peak > 1.0:
            out = out / np.float32(peak)  # scale, never clip (see the level policy above)
        return out.astype(np.float32, copy=False)

    def _load(self, path: str, what: str) -> np.ndarray:
        try:
            wave = load_audio(path)
        except AudioError as err:
            raise AugmentError(f"{what} file {err}; remove it from the {what} folder") from None
        if float(np.abs(wave).max()) == 0.0:
            raise AugmentError(
                f"{path}: {what} file is all zeros; remove it from the {what} folder"
            )
        return wave

    def _noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.noise_files:
            path = self.noise_files[int(rng.integers(len(self.noise_files)))]
            return random_crop(self._load(path, "noise"), n, rng)
        return coloured_noise(n, float(rng.uniform(*self.config.noise_slope)), rng)

    def _rir(self, rng: np.random.Generator) -> np.ndarray:
        if self.rir_files:
            return self._load(self.rir_files[int(rng.integers(len(self.rir_files)))], "RIR")
        cfg = self.config
        return synthetic_rir(float(rng.uniform(*cfg.rt60)), float(rng.uniform(*cfg.drr_db)), rng)


def make_view(
    wave: np.ndarray,
    utt_id: str,
    view: int,
    *,
    seed: int,
    crop_samples: int,
    augmenter: Augmenter | None,
) -> np.ndarray:
    """One training view of an utterance, a pure function of (seed, utt_id, view).

    View 0 is a clean crop (its position still drawn from the view's generator); views
    >= 1 are crops passed through ``augmenter`` (with ``augmenter=None`` they are just
    other clean crops). Shorter waves are repeat-padded.

    Args:
        wave: (T,) float32 at 16 kHz, the whole utterance.
    Returns:
        (crop_samples,) float32.
    """
    rng = view_rng(seed, utt_id, view)
    if view == 0 or augmenter is None:
        return random_crop(wave, crop_samples, rng)
    piece = random_crop(wave, augmenter.input_samples(crop_samples), rng)
    return augmenter(piece, rng, crop_samples)
