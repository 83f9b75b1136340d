"""Decoding audio files into 16 kHz mono float32 waves; the only module that touches codecs.

wav/flac (and whatever else libsndfile reads) go through soundfile, m4a/AAC and anything
libsndfile refuses through PyAV (FFmpeg). Any rate is resampled to 16 kHz with
``scipy.signal.resample_poly`` at the gcd-reduced ratio (44.1k -> 16k is 160/441): a
Kaiser-windowed polyphase FIR, exact for rational ratios, numpy in and out, and free of
the torch thread pool, which matters in DataLoader workers. Channels are averaged.

A file that cannot give a usable wave raises :class:`AudioError` with a ``reason``:

- ``unreadable``: not audio, no audio stream, decoder error at open, non-finite samples;
- ``empty``: no samples (0-byte file or a header with 0 frames);
- ``truncated``: fewer samples than the header promises, or a decoder error mid-stream;
- ``silent``: peak below ``SILENCE_PEAK`` (digital silence), from :func:`check_wave`;
- ``too_short``: shorter than ``min_seconds``, or than the encoder takes whatever
  ``min_seconds`` says (each encoder module's ``min_samples``; ReDimNet's ``MIN_SAMPLES``
  by default), from :func:`check_length` (and :func:`check_wave`).

Every function opens its own file handles and keeps no module state, so it is safe in
worker processes.
"""

from __future__ import annotations

import os
import struct
from math import gcd

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
# Peak of digital silence after decoding: below one 16-bit step (3e-5) times a few for
# dither and codec noise floors; any real recording peaks orders of magnitude higher.
SILENCE_PEAK = 1e-4
# ReDimNet's mel front end pads 256 samples (n_fft / 2) on each side by reflection, which
# needs a longer wave: 256 samples or fewer crash it. Other encoders declare their own
# minimum (``min_samples`` in their module; ECAPA-TDNN 640, CAM++ 720), checked wherever
# the encoder is known.
MIN_SAMPLES = 257
REASONS = ("unreadable", "empty", "truncated", "silent", "too_short")
# Extensions that never go to libsndfile (it cannot read MP4 containers). Ogg Vorbis does:
# libsndfile returns every sample of it, where PyAV dropped the last 256 (1 s test tone).
_PYAV_EXTENSIONS = (".m4a", ".mp4", ".aac", ".mp3", ".opus", ".webm")


class AudioError(Exception):
    """A file that gives no usable wave; ``.reason`` is one of ``REASONS``, ``.path`` the file."""

    def __init__(self, path, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown AudioError reason {reason!r}")
        self.path = os.fspath(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}: {detail}")

    def __reduce__(self):
        # Crosses process boundaries (worker -> main) intact.
        return AudioError, (self.path, self.reason, self.detail)


def load_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a file to a mono float32 wave at ``sample_rate``.

    Checks unreadable/empty/truncated; call :func:`check_wave` for silent/too-short.

    Args:
        path: audio file (wav, flac, m4a, anything FFmpeg decodes).
        sample_rate: output rate in Hz.
    Returns:
        (T,) float32.
    Raises:
        AudioError: see the module docstring.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise AudioError(path, "empty", "file has 0 bytes")
    except OSError as err:
        raise AudioError(path, "unreadable", f"cannot open ({err.strerror or err})") from None
    if path.lower().endswith(_PYAV_EXTENSIONS):
        wave, rate = _decode_pyav(path)
    else:
        try:
            wave, rate = _decode_soundfile(path)
        except _NotForSoundfile:
            wave, rate = _decode_pyav(path)
    if wave.shape[0] == 0:
        raise AudioError(path, "empty", "header holds 0 samples")
    wave = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]  # (T,)
    if not np.isfinite(wave).all():
        raise AudioError(path, "unreadable", "samples are NaN or infinite")
    return resample(wave, rate, sample_rate)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a (T,) wave between integer rates with a polyphase FIR; returns (T',) float32."""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_rate == new_rate:
        return wave
    from scipy.signal import resample_poly

    g = gcd(int(orig_rate), int(new_rate))
    return resample_poly(wave, new_rate // g, orig_rate // g).astype(np.float32, copy=False)


def check_length(wave: np.ndarray, path, min_seconds: float = 0.0, sample_rate: int = SAMPLE_RATE,
                 minimum: tuple[int, str] = (MIN_SAMPLES, "the model")) -> None:
    """Raise AudioError("too_short") if ``wave`` (T,) lasts less than ``min_seconds`` or has
    fewer samples than the encoder takes: ``minimum`` is (samples, who needs them), from
    ``mrlcache.backbone.registry.wave_minimum(model)`` (default ReDimNet's ``MIN_SAMPLES``)."""
    seconds = wave.shape[0] / sample_rate
    need, who = minimum
    if wave.shape[0] < need:
        raise AudioError(path, "too_short", f"{wave.shape[0]} samples, {who} needs at least {need}")
    if seconds < min_seconds:
        raise AudioError(
            path, "too_short", f"{seconds:.2f} s of audio, at least {min_seconds:g} s needed"
        )


def peak(wave: np.ndarray) -> float:
    """Largest absolute sample of ``wave`` (T,); below ``SILENCE_PEAK`` is digital silence."""
    return float(np.abs(wave).max()) if wave.size else 0.0


def check_wave(wave: np.ndarray, path, min_seconds: float, sample_rate: int = SAMPLE_RATE,
               minimum: tuple[int, str] = (MIN_SAMPLES, "the model")) -> None:
    """Raise AudioError("too_short") as :func:`check_length` does, or AudioError("silent")
    if the peak of ``wave`` (T,) is below ``SILENCE_PEAK``."""
    check_length(wave, path, min_seconds, sample_rate, minimum)
    top = peak(wave)
    if top < SILENCE_PEAK:
        raise AudioError(
            path, "silent", f"peak {top:.1e} is below {SILENCE_PEAK:.0e} (digital silence)"
        )


def audio_info(path) -> tuple[int, int | None, int]:
    """Read (sample_rate, frames or None if unknown, channels) from the header, cheaply.

    Frames are at the file's own rate. Raises AudioError("unreadable") if no header is found.
    """
    path = os.fspath(path)
    if not path.lower().endswith(_PYAV_EXTENSIONS):
        try:
            info = sf.info(path)
            return info.samplerate, info.frames, info.channels
        except (sf.LibsndfileError, RuntimeError):
            pass  # not a libsndfile format: ask FFmpeg below
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError(path, "unreadable", "no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            channels = stream.codec_context.layout.nb_channels
            frames = None
            if stream.duration is not None and stream.time_base is not None:
                frames = int(round(stream.duration * stream.time_base * rate))
            return rate, frames, channels
    except (av.FFmpegError, OSError) as err:
        raise AudioError(path, "unreadable", f"not an audio file FFmpeg can open ({err})") from None


class _NotForSoundfile(Exception):
    """libsndfile cannot open this file: let FFmpeg try."""


def _decode_soundfile(path: str) -> tuple[np.ndarray, int]:
    """Returns ((T, C) float32, rate)."""
    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError):
        raise _NotForSoundfile from None
    with f:
        rate, frames = f.samplerate, f.frames
        try:
            wave = f.read(dtype="float32", always_2d=True)  # (T, C)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise AudioError(path, "truncated", f"decoder error after the header ({err})") from None
        if f.format == "WAV":
            # libsndfile silently shortens a wav's frame count to what the file holds;
            # the data chunk size in the header still says what was written.
            frames = max(frames, _wav_header_frames(path) or 0)
    if wave.shape[0] < frames:
        raise AudioError(
            path, "truncated", f"{wave.shape[0]} of the {frames} frames the header announces"
        )
    return wave, rate


def _wav_header_frames(path: str) -> int | None:
    """Frames a RIFF/WAVE header announces (data chunk size / block align), or None."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None  # RIFX/RF64/W64 and friends: trust libsndfile
        block_align = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            ident, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if ident == b"fmt " and size >= 16:
                block_align = struct.unpack("<H", f.read(16)[12:14])[0]
                f.seek(size - 16 + (size & 1), 1)
            elif ident == b"data":
                # 0 and 0xFFFFFFFF are "unknown size" from streaming writers.
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            else:
                f.seek(size + (size & 1), 1)  # chunks are padded to even sizes


def _decode_pyav(path: str) -> tuple[np.ndarray, int]:
    """Returns ((T, C) float32, rate)."""
    import av

    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise AudioError(path, "unreadable", f"not an audio file FFmpeg can open ({err})") from None
    with container:
        if not container.streams.audio:
            raise AudioError(path, "unreadable", "no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        # Convert whatever sample format the decoder gives (s16, fltp, ...) to planar
        # float32 without touching rate or channel layout: mixing is done below by plain
        # averaging, like every other format.
        to_float = av.AudioResampler(format="fltp")
        chunks = []  # (C, n) each
        try:
            for frame in container.decode(stream):
                for out in to_float.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in to_float.resample(None):  # flush
                chunks.append(out.to_ndarray())
        except av.FFmpegError as err:
            if not chunks:
                detail = f"decoder error at the start ({err})"
                raise AudioError(path, "unreadable", detail) from None
            raise AudioError(path, "truncated", f"decoder error mid-stream ({err})") from None
        expected = None
        if stream.duration is not None and stream.time_base is not None:
            expected = int(stream.duration * stream.time_base * rate)
    if not chunks:
        return np.zeros((0, 1), np.float32), rate
    wave = np.concatenate(chunks, axis=1).T  # (T, C)
    # AAC decodes in 1024-sample frames and may add or drop a frame of priming/padding
    # against the container's duration; a cut file misses far more.
    if expected is not None and wave.shape[0] < expected - max(4096, expected // 50):
        detail = f"{wave.shape[0]} of the {expected} samples the container announces"
        raise AudioError(path, "truncated", detail)
    return np.ascontiguousarray(wave, dtype=np.float32), rate
