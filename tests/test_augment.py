"""Views and augmentation: determinism, padding, SNR, reverberation, noise/RIR folders."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import speech_like, write_flac, write_wav

from mrlcache.augment import (
    AugmentConfig,
    Augmenter,
    AugmentError,
    add_noise,
    coloured_noise,
    make_view,
    random_crop,
    reverberate,
    synthetic_rir,
    view_rng,
)

QUIET = dict(p_noise=0.0, p_reverb=0.0, gain_db=(0.0, 0.0))  # augmenter that changes nothing
NO_REVERB = dict(p_reverb=0.0, gain_db=(0.0, 0.0))
NO_NOISE = dict(p_noise=0.0, gain_db=(0.0, 0.0))


def _snr_db(clean, mixed):
    clean = clean.astype(np.float64)
    return 10 * np.log10(np.mean(clean**2) / np.mean((mixed - clean) ** 2))


def _find(segment, wave):
    """Start of ``segment`` inside ``wave`` as an exact contiguous slice, or None."""
    for start in np.flatnonzero(wave[: len(wave) - len(segment) + 1] == segment[0]):
        if np.array_equal(wave[start : start + len(segment)], segment):
            return int(start)
    return None


def test_view_rng_is_a_pure_function_of_its_arguments():
    draw = lambda *a: view_rng(*a).integers(0, 2**62, size=4)  # noqa: E731
    np.testing.assert_array_equal(draw(7, "id1/v/1.wav", 2), draw(7, "id1/v/1.wav", 2))
    others = [draw(8, "id1/v/1.wav", 2), draw(7, "id1/v/2.wav", 2), draw(7, "id1/v/1.wav", 3)]
    assert all(not np.array_equal(draw(7, "id1/v/1.wav", 2), o) for o in others)
    # "1" + "2" must not collide with "12" + "": the fields are separated.
    assert not np.array_equal(draw(1, "2", 0), draw(12, "", 0))


def test_view_rng_is_stable_across_interpreters():
    code = (
        "from mrlcache.augment import view_rng; "
        "print(view_rng(3, 'id9/x/00001.wav', 1).integers(0, 2**62, 3).tolist())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": hs},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hs in ("1", "999")
    }
    assert outs == {str(view_rng(3, "id9/x/00001.wav", 1).integers(0, 2**62, 3).tolist()) + "\n"}


def test_random_crop_long_wave_is_a_slice():
    wave = np.arange(1000, dtype=np.float32)
    starts = set()
    for seed in range(20):
        crop = random_crop(wave, 300, np.random.default_rng(seed))
        assert crop.dtype == np.float32 and crop.shape == (300,)
        np.testing.assert_array_equal(np.diff(crop), 1.0)  # contiguous
        starts.add(crop[0])
    assert len(starts) > 10 and min(starts) >= 0 and max(starts) <= 700
    assert np.array_equal(random_crop(wave, 1000, np.random.default_rng(0)), wave)


def test_random_crop_repeat_pads_short_waves():
    wave = np.arange(1, 101, dtype=np.float32)  # 100 samples, no zeros
    crop = random_crop(wave, 350, np.random.default_rng(1))
    assert crop.shape == (350,)
    # The utterance looped: period 100, every value from the wave, nothing zero-padded.
    np.testing.assert_array_equal(crop[100:], crop[:-100])
    assert set(crop[:100].tolist()) == set(wave.tolist())
    np.testing.assert_array_equal(np.roll(crop[:100], int(crop[0]) - 1), wave)  # a rotation
    with pytest.raises(ValueError, match="empty"):
        random_crop(np.zeros(0, np.float32), 10, np.random.default_rng(0))


def test_make_view_determinism_and_clean_view_zero():
    wave = speech_like(3.0, seed=1)
    aug = Augmenter()
    kw = dict(seed=5, crop_samples=16000, augmenter=aug)
    views = [make_view(wave, "id1/v/1.wav", v, **kw) for v in range(4)]
    for v in range(4):
        again = make_view(wave, "id1/v/1.wav", v, **kw)
        assert again.dtype == np.float32 and again.shape == (16000,)
        np.testing.assert_array_equal(again, views[v])
    assert _find(views[0], wave) is not None  # view 0: an untouched window of the utterance
    for v in range(1, 4):
        assert _find(views[v], wave) is None
        assert not np.array_equal(views[v], views[v - 1])
    other_utt = make_view(wave, "id1/v/2.wav", 1, **kw)
    assert not np.array_equal(other_utt, views[1])


def test_make_view_repeat_pads_short_utterances():
    wave = speech_like(0.4, seed=2)  # 6400 samples for a 16000-sample crop
    view = make_view(wave, "u", 0, seed=0, crop_samples=16000, augmenter=Augmenter())
    np.testing.assert_array_equal(view[6400:], view[:-6400])
    assert _find(view[:6400], np.tile(wave, 2)) is not None
    augmented = make_view(wave, "u", 1, seed=0, crop_samples=16000, augmenter=Augmenter())
    assert augmented.shape == (16000,) and np.isfinite(augmented).all()


@pytest.mark.parametrize("snr", [-5.0, 0.0, 7.5, 20.0])
def test_add_noise_hits_the_snr(snr):
    rng = np.random.default_rng(0)
    wave = speech_like(1.0)
    mixed = add_noise(wave, rng.standard_normal(16000).astype(np.float32) * 3.0, snr)
    assert mixed.dtype == np.float32
    assert abs(_snr_db(wave, mixed) - snr) < 0.01


def test_augmenter_noise_at_the_drawn_snr():
    wave = 0.3 * speech_like(2.0, seed=4)
    for slope in (0.0, 1.0, 2.0):
        cfg = AugmentConfig(
            p_noise=1.0, snr_db=(7.0, 7.0), noise_slope=(slope, slope), **NO_REVERB
        )
        out = Augmenter(cfg)(wave, np.random.default_rng(3))
        assert abs(_snr_db(wave, out) - 7.0) < 0.05


@pytest.mark.parametrize("slope", [0.0, 1.0, 2.0])
def test_coloured_noise_has_the_requested_spectral_slope(slope):
    noise = coloured_noise(2**16, slope, np.random.default_rng(0))
    assert abs(np.sqrt(np.mean(noise**2)) - 1.0) < 1e-4
    power = np.abs(np.fft.rfft(noise)) ** 2
    f = np.arange(len(power))
    band = (f > 30) & (f < len(power) - 30)
    fit = np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0]
    assert abs(fit + slope) < 0.1


def test_synthetic_rir_decays_at_its_rt60():
    rir = synthetic_rir(0.5, 5.0, np.random.default_rng(0))
    assert rir.shape == (8000,) and int(np.argmax(np.abs(rir))) == 0
    assert abs(np.sum(rir.astype(np.float64) ** 2) - 1.0) < 1e-5
    # Schroeder backward integration on the tail; the -5..-25 dB slope gives T20 * 3 = RT60.
    edc = np.cumsum(rir[1:][::-1].astype(np.float64) ** 2)[::-1]
    edc_db = 10 * np.log10(edc / edc[0])
    t5, t25 = np.argmax(edc_db < -5), np.argmax(edc_db < -25)
    assert abs(3 * (t25 - t5) / 16000 - 0.5) < 0.05


def test_reverberate_keeps_length_alignment_and_level():
    wave = np.zeros(16000, np.float32)
    wave[[2000, 9000, 15000]] = [0.5, -0.8, 0.3]  # clicks
    rir = np.zeros(1200, np.float32)
    rir[200] = 1.0  # direct path after a 200-sample propagation delay
    decay = np.exp(-np.arange(999) / 150.0)
    rir[201:] = 0.3 * decay * np.random.default_rng(0).standard_normal(999)
    out = reverberate(wave, rir)
    assert out.shape == wave.shape and out.dtype == np.float32
    assert abs(np.sqrt(np.mean(out**2)) - np.sqrt(np.mean(wave**2))) < 1e-6
    for click in (2000, 9000):
        assert int(np.argmax(np.abs(out[click - 100 : click + 100]))) == 100
    assert np.abs(out[2001:2400]).max() > 0.01  # and it does ring


def test_level_policy_never_clips():
    wave = 0.9 * speech_like(1.0, seed=5) / 0.5  # peak 0.9
    out = Augmenter(AugmentConfig(gain_db=(20.0, 20.0)))(wave, np.random.default_rng(0))
    assert np.isfinite(out).all() and abs(float(np.abs(out).max()) - 1.0) < 1e-6
    assert np.sum(np.abs(out) >= 0.999) < 5  # scaled, not a flat clipped top


def test_speed_perturbation_shifts_pitch_and_keeps_length():
    sr = 16000
    tone = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(3 * sr) / sr)).astype(np.float32)
    aug = Augmenter(AugmentConfig(speed=True, speeds=(1.1,), **QUIET))
    assert aug.input_samples(16000) == 17600
    view = make_view(tone, "u", 1, seed=0, crop_samples=16000, augmenter=aug)
    assert view.shape == (16000,)
    assert int(np.argmax(np.abs(np.fft.rfft(view)))) == 1100  # 1 Hz bins
    off = Augmenter(AugmentConfig(**QUIET))
    assert off.input_samples(16000) == 16000
    clean = make_view(tone, "u", 1, seed=0, crop_samples=16000, augmenter=off)
    assert _find(clean, tone) is not None


def test_noise_and_rir_folders_are_used(tmp_path):
    sr = 44100  # noise files at another rate must be resampled too
    hum = (0.2 * np.sin(2 * np.pi * 5000 * np.arange(sr) / sr)).astype(np.float32)
    write_wav(tmp_path / "noise" / "b" / "hum.wav", hum, sr)
    write_flac(tmp_path / "noise" / "a" / "hum2.flac", hum, sr)
    noise = tmp_path / "noise"
    (noise / "README.txt").write_text("not audio")
    cfg = AugmentConfig(noise_dir=str(noise), p_noise=1.0, snr_db=(5.0, 5.0), **NO_REVERB)
    aug = Augmenter(cfg)
    assert aug.noise_files == [str(noise / "a" / "hum2.flac"), str(noise / "b" / "hum.wav")]
    wave = 0.3 * speech_like(1.0, seed=6)
    out = aug(wave, np.random.default_rng(0))
    added = out - wave
    assert int(np.argmax(np.abs(np.fft.rfft(added)))) == 5000  # the hum, 1 Hz bins
    assert abs(_snr_db(wave, out) - 5.0) < 0.05

    rir = np.zeros(2000, np.float32)
    rir[100], rir[900] = 1.0, 0.5  # direct path and one echo 800 samples later
    write_wav(tmp_path / "rirs" / "room1.wav", rir, 16000, subtype="FLOAT")
    cfg = AugmentConfig(rir_dir=str(tmp_path / "rirs"), p_reverb=1.0, **NO_NOISE)
    aug = Augmenter(cfg)
    out = aug(wave, np.random.default_rng(0))
    expected = wave.copy()
    expected[800:] += 0.5 * wave[:-800]
    expected *= np.sqrt(np.mean(wave**2) / np.mean(expected**2))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_bad_augmentation_folders_fail_clearly(tmp_path):
    with pytest.raises(AugmentError, match="noise folder does not exist"):
        Augmenter(AugmentConfig(noise_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AugmentError, match="no audio files .* in the RIR folder"):
        Augmenter(AugmentConfig(rir_dir=str(tmp_path / "empty")))
    write_wav(tmp_path / "zeros" / "z.wav", np.zeros(1000, np.float32), 16000)
    aug = Augmenter(AugmentConfig(noise_dir=str(tmp_path / "zeros"), p_noise=1.0))
    with pytest.raises(AugmentError, match="z.wav: noise file is all zeros"):
        aug(speech_like(0.5), np.random.default_rng(0))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.wav").write_text("garbage" * 30)
    aug = Augmenter(AugmentConfig(rir_dir=str(tmp_path / "bad"), p_reverb=1.0))
    with pytest.raises(AugmentError, match="RIR file .*x.wav: unreadable"):
        aug(speech_like(0.5), np.random.default_rng(0))


def test_config_round_trips_through_json():
    cfg = AugmentConfig(noise_dir="/musan/noise", snr_db=(5.0, 10.0), speed=True)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert AugmentConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown augmentation setting.*snr"):
        AugmentConfig.from_dict({"snr": [0, 1]})
