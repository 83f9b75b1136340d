"""Audio decoding: formats, rates, channel mixing, resampling accuracy and broken files."""

import pickle
from concurrent.futures import ProcessPoolExecutor
import multiprocessing

import numpy as np
import pytest
from conftest import BROKEN_MIN_SECONDS, broken_files, speech_like, write_flac, write_m4a, write_wav

from mrlcache.audio import SAMPLE_RATE, AudioError, audio_info, check_wave, load_audio, resample

WRITERS = {"wav": write_wav, "flac": write_flac, "m4a": write_m4a}
RATES = (8000, 22050, 44100, 48000)


def _sine(freq, seconds, sr, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def _tone(wave, sr):
    """(frequency in Hz, amplitude) of the strongest sinusoid, away from the edges."""
    x = wave[len(wave) // 8 : -len(wave) // 8].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=8 * len(x)))  # 8x zero padding
    k = int(np.argmax(spectrum))
    a, b, c = np.log(spectrum[k - 1 : k + 2])
    offset = 0.5 * (a - c) / (a - 2 * b + c)  # parabolic peak interpolation
    return (k + offset) * sr / (8 * len(x)), np.sqrt(2 * np.mean(x**2))


@pytest.mark.parametrize("fmt", ["wav", "flac", "m4a"])
@pytest.mark.parametrize("sr", RATES)
def test_decode_resamples_a_sine_faithfully(tmp_path, fmt, sr):
    path = WRITERS[fmt](tmp_path / f"tone.{fmt}", _sine(1000.0, 1.0, sr), sr)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    # AAC adds up to ~2 frames of priming/padding (1024 samples each at the file's rate).
    slack = 0 if fmt != "m4a" else int(2 * 1024 * SAMPLE_RATE / sr) + 1
    assert SAMPLE_RATE <= len(wave) <= SAMPLE_RATE + slack
    freq, amp = _tone(wave, SAMPLE_RATE)
    assert abs(freq - 1000.0) < 0.5
    assert abs(amp - 0.5) < (0.005 if fmt != "m4a" else 0.03)


def test_resampler_removes_content_above_the_new_nyquist():
    # A 10 kHz tone cannot exist at 16 kHz; a poor filter would alias it to 6 kHz.
    out = resample(_sine(10000.0, 1.0, 48000), 48000, SAMPLE_RATE)
    assert len(out) == SAMPLE_RATE
    assert np.sqrt(np.mean(out[2000:-2000] ** 2)) < 1e-3
    # ... while a 7 kHz tone (below 8 kHz) passes at nearly full level.
    freq, amp = _tone(resample(_sine(7000.0, 1.0, 44100), 44100, SAMPLE_RATE), SAMPLE_RATE)
    assert abs(freq - 7000.0) < 0.5 and abs(amp - 0.5) < 0.02


@pytest.mark.parametrize("fmt", ["wav", "flac", "m4a"])
def test_channels_are_averaged(tmp_path, fmt):
    left, right = _sine(500.0, 1.0, 16000, amp=0.4), _sine(1500.0, 1.0, 16000, amp=0.2)
    wave = load_audio(WRITERS[fmt](tmp_path / f"st.{fmt}", np.stack([left, right], axis=1), 16000))
    spectrum = np.abs(np.fft.rfft(wave[:16000])) * 2 / 16000  # 1 Hz bins, amplitude scale
    tol = 0.002 if fmt != "m4a" else 0.02
    assert abs(spectrum[500] - 0.2) < tol and abs(spectrum[1500] - 0.1) < tol


def test_four_channels_mean_is_exact(tmp_path):
    base = speech_like(0.5, seed=3)
    gains = np.array([1.0, 0.5, -0.25, 0.0], np.float32)
    path = write_wav(tmp_path / "quad.wav", base[:, None] * gains, 16000, subtype="FLOAT")
    wave = load_audio(path)
    np.testing.assert_allclose(wave, base * gains.mean(), atol=1e-7)


def test_broken_files_reasons(tmp_path):
    expected = broken_files(tmp_path)
    assert sorted(expected.values()) == ["empty", "silent", "too_short", "truncated", "unreadable"]
    for path, reason in expected.items():
        with pytest.raises(AudioError) as info:
            check_wave(load_audio(path), path, BROKEN_MIN_SECONDS)
        err = info.value
        assert (err.reason, err.path) == (reason, str(path))
        assert str(err).startswith(f"{path}: {reason}: ") and "\n" not in str(err)


def _expect(path, reason, match=None):
    with pytest.raises(AudioError, match=match) as info:
        load_audio(path)
    assert info.value.reason == reason, str(info.value)


def test_more_broken_files(tmp_path):
    _expect(tmp_path / "missing.wav", "unreadable", "cannot open")
    (tmp_path / "zero.wav").write_bytes(b"")
    _expect(tmp_path / "zero.wav", "empty", "0 bytes")
    (tmp_path / "text.m4a").write_text("not an mp4\n" * 50)
    _expect(tmp_path / "text.m4a", "unreadable")

    nan = speech_like(0.5)
    nan[100] = np.nan
    _expect(write_wav(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT"), "unreadable", "NaN")

    flac = write_flac(tmp_path / "cut.flac", speech_like(1.0), 16000).read_bytes()
    (tmp_path / "cut.flac").write_bytes(flac[: len(flac) // 2])
    _expect(tmp_path / "cut.flac", "truncated")

    # An index-first (streaming) m4a opens, then runs out of data.
    m4a = write_m4a(tmp_path / "cut.m4a", speech_like(1.0), 16000, faststart=True).read_bytes()
    (tmp_path / "cut.m4a").write_bytes(m4a[: int(len(m4a) * 0.6)])
    _expect(tmp_path / "cut.m4a", "truncated")
    # An index-last m4a cut short has lost its index: it cannot even be opened.
    m4a = write_m4a(tmp_path / "cut2.m4a", speech_like(1.0), 16000).read_bytes()
    (tmp_path / "cut2.m4a").write_bytes(m4a[: int(len(m4a) * 0.6)])
    _expect(tmp_path / "cut2.m4a", "unreadable")


def test_wav_with_extra_chunks_is_not_called_truncated(tmp_path):
    # A LIST chunk before the data and an odd-sized chunk after it, as editors write.
    wave = speech_like(0.5)
    raw = write_wav(tmp_path / "plain.wav", wave, 16000).read_bytes()
    fmt_chunk, data_chunk = raw[12:36], raw[36:]
    extra = b"LIST" + (5).to_bytes(4, "little") + b"INFOx\x00"
    tail = b"junk" + (3).to_bytes(4, "little") + b"abc\x00"
    body = b"WAVE" + fmt_chunk + extra + data_chunk + tail
    (tmp_path / "chunks.wav").write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    wave_plain = load_audio(tmp_path / "plain.wav")
    np.testing.assert_array_equal(load_audio(tmp_path / "chunks.wav"), wave_plain)


def test_check_wave_limits():
    wave = speech_like(1.0)
    check_wave(wave, "x.wav", 1.0)  # exactly long enough
    with pytest.raises(AudioError, match="too_short"):
        check_wave(wave[:-1], "x.wav", 1.0)
    check_wave(wave * 0.002, "quiet.wav", 0.5)  # quiet is not silent
    dither = np.random.default_rng(0).uniform(-3e-5, 3e-5, 16000).astype(np.float32)
    with pytest.raises(AudioError, match="silent"):
        check_wave(dither, "dither.wav", 0.5)


def test_audio_info_reads_headers(tmp_path):
    stereo = np.stack([speech_like(0.5, sr=22050)] * 2, axis=1)
    assert audio_info(write_wav(tmp_path / "a.wav", stereo, 22050)) == (22050, 11025, 2)
    assert audio_info(write_flac(tmp_path / "a.flac", stereo[:, 0], 48000)) == (48000, 11025, 1)
    rate, frames, channels = audio_info(write_m4a(tmp_path / "a.m4a", stereo, 22050))
    assert (rate, channels) == (22050, 2) and abs(frames - 11025) <= 2048
    (tmp_path / "bad.wav").write_text("nope" * 100)
    with pytest.raises(AudioError, match="unreadable"):
        audio_info(tmp_path / "bad.wav")


def test_error_pickles_and_workers_decode_identically(tmp_path):
    err = AudioError("/a/b.wav", "truncated", "half of it")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))

    paths = [
        write_wav(tmp_path / "a.wav", speech_like(0.5, sr=44100), 44100),
        write_m4a(tmp_path / "b.m4a", speech_like(0.5, sr=22050), 22050),
        *broken_files(tmp_path),
    ]
    local = [_load_or_reason(p) for p in paths]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        remote = list(pool.map(_load_or_reason, paths))
    for a, b in zip(local, remote):
        assert type(a) is type(b)
        if isinstance(a, str):
            assert a == b
        else:
            np.testing.assert_array_equal(a, b)


def _load_or_reason(path):
    try:
        return load_audio(path)
    except AudioError as err:
        return err.reason


@pytest.mark.parametrize("name, options", [
    ("x.mp3", dict(format="MP3", subtype="MPEG_LAYER_III")),
    ("x.ogg", dict(format="OGG", subtype="VORBIS")),
    ("x.opus", dict(format="OGG", subtype="OPUS")),
])
def test_mp3_ogg_and_opus_decode_to_the_written_wave(tmp_path, name, options):
    import soundfile as sf

    wave = speech_like(1.0, seed=3) * 0.5
    try:
        sf.write(tmp_path / name, wave, SAMPLE_RATE, **options)
    except (sf.LibsndfileError, TypeError, ValueError) as err:
        pytest.skip(f"this libsndfile cannot write {name}: {err}")
    decoded = load_audio(tmp_path / name)
    assert decoded.shape == wave.shape  # every sample, none dropped or padded
    # Lossy codecs: the decoded wave follows the original closely, sample for sample.
    assert np.corrcoef(decoded, wave)[0, 1] > 0.95


def test_a_wave_too_short_for_the_model_is_too_short_whatever_min_seconds_says():
    from mrlcache.audio import MIN_SAMPLES, check_length

    wave = speech_like(1.0)
    check_wave(wave[:MIN_SAMPLES], "ok.wav", 0.0)
    for min_seconds in (0.0, 0.001):
        with pytest.raises(AudioError, match=f"too_short: {MIN_SAMPLES - 1} samples, the model needs"):
            check_wave(wave[:MIN_SAMPLES - 1], "tiny.wav", min_seconds)
        with pytest.raises(AudioError, match="too_short"):
            check_length(wave[:100], "tiny.wav", min_seconds)
    check_length(np.zeros(MIN_SAMPLES, np.float32), "silent.wav")  # length only: silence is not checked
