"""The synthetic corpus: determinism, layout, trial list, refusal rules, CLI, and separability."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from scipy.fft import dct
from scipy.linalg import eigh

from mrlcache.cli import main
from mrlcache.corpus import scan_tree
from mrlcache.metrics import eer
from mrlcache.demo.synth import SynthError, make_corpus, utterance_audio
from mrlcache.trials import read_trials

TINY = dict(speakers=4, utterances=4, test_speakers=2, videos=2, seconds=(0.5, 0.8))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path):
    a = _files(Path(make_corpus(tmp_path / "a", seed=3, **TINY)["out"]))
    b = _files(Path(make_corpus(tmp_path / "b", seed=3, **TINY)["out"]))
    assert a == b
    assert sum(name.endswith(".wav") for name in a) == 16
    c = _files(Path(make_corpus(tmp_path / "c", seed=4, **TINY)["out"]))
    wavs_a = [v for k, v in a.items() if k.endswith(".wav")]
    wavs_c = [v for k, v in c.items() if k.endswith(".wav")]
    assert len(wavs_c) == len(wavs_a)
    assert not set(wavs_a) & set(wavs_c)  # no file is shared between the two seeds
    assert a["trials.txt"] != c["trials.txt"]  # video ids differ with the seed


def test_a_speaker_does_not_depend_on_corpus_size(tmp_path):
    small = make_corpus(tmp_path / "s", seed=1, speakers=3, utterances=2, test_speakers=2,
                        seconds=(0.5, 0.6))
    large = make_corpus(tmp_path / "l", seed=1, speakers=5, utterances=2, test_speakers=2,
                        seconds=(0.5, 0.6))
    first = _files(Path(small["train_dir"]) / "id10001")
    assert first and first == _files(Path(large["train_dir"]) / "id10001")
    # The library function gives exactly what was written.
    # Utterances 0 and 1 of speaker 0 are 00001.wav of its videos 0 and 1.
    written = {sf.read(p, dtype="int16")[0].tobytes()
               for p in (Path(small["train_dir"]) / "id10001").rglob("*.wav")}
    assert written == {utterance_audio(1, 0, u, u, seconds=(0.5, 0.6)).tobytes() for u in (0, 1)}


def test_layout_and_trials(tmp_path):
    summary = make_corpus(tmp_path / "c", seed=0, speakers=5, utterances=6, test_speakers=3,
                          videos=3, seconds=(0.5, 0.9))
    out = Path(summary["out"])
    train, test = scan_tree(out / "train"), scan_tree(out / "test")
    assert len(train) == summary["train_utterances"] == 2 * 6
    assert len(test) == summary["test_utterances"] == 3 * 6
    assert {u.speaker for u in train} == {"id10001", "id10002"}
    assert {u.speaker for u in test} == {"id10003", "id10004", "id10005"}
    for u in train + test:
        spk, video, name = u.utt_id.split("/")
        assert len(video) == 11 and name in {"00001.wav", "00002.wav"}  # 6 utts over 3 videos
        info = sf.info(u.path)
        assert info.samplerate == 16000 and info.subtype == "PCM_16" and info.channels == 1
        assert 0.5 <= info.duration <= 0.9
    for spk in {u.speaker for u in test}:
        assert len({u.utt_id.split("/")[1] for u in test if u.speaker == spk}) == 3

    trials = read_trials(out / "trials.txt")
    test_ids = {u.utt_id for u in test}
    assert set(trials.enroll) | set(trials.test) <= test_ids
    labels = trials.labels.astype(int)
    # Every cross-video pair of a speaker: 3 videos x 2 utts -> 15 pairs - 3 same-video = 12.
    assert labels.sum() == 3 * 12 == summary["target_trials"]
    assert (1 - labels).sum() == labels.sum() == summary["nontarget_trials"]
    pairs = set()
    for label, a, b in zip(labels, trials.enroll, trials.test):
        same_speaker = a.split("/")[0] == b.split("/")[0]
        assert same_speaker == bool(label)
        if label:
            assert a.split("/")[1] != b.split("/")[1]  # target trials cross videos
        assert frozenset((a, b)) not in pairs
        pairs.add(frozenset((a, b)))
    assert (out / "trials.txt").read_text().splitlines()[0].count(" ") == 2

    meta = json.loads((out / "corpus.json").read_text())
    assert meta["format"] == "mrlcache-synth-corpus"
    assert meta["settings"]["seed"] == 0 and meta["settings"]["videos"] == 3
    assert meta["test_speakers"] == ["id10003", "id10004", "id10005"]


def test_trials_per_speaker(tmp_path):
    summary = make_corpus(tmp_path / "c", seed=0, trials_per_speaker=3, **TINY)
    assert summary["target_trials"] == summary["nontarget_trials"] == 2 * 3
    with pytest.raises(SynthError, match="cross-video"):
        make_corpus(tmp_path / "d", seed=0, trials_per_speaker=5, **TINY)  # 2x2 pairs only


def test_refuses_foreign_and_existing_directories(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(SynthError, match="holds no synthetic corpus"):
            make_corpus(foreign, overwrite=overwrite, **TINY)
    assert (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "c"
    make_corpus(out, seed=0, **TINY)
    with pytest.raises(SynthError, match="overwrite"):
        make_corpus(out, seed=1, **TINY)
    make_corpus(out, seed=1, overwrite=True, **{**TINY, "speakers": 3})
    assert len(list((out / "train").iterdir())) == 1  # the old speakers are gone
    assert json.loads((out / "corpus.json").read_text())["settings"]["seed"] == 1


def test_plain_voices_and_clean_channel_are_opt_in_variants(tmp_path):
    """--voices plain / --channel clean change only what they name; the default stays the default."""
    from mrlcache.demo.voice import draw_channel, draw_speaker

    default, plain = draw_speaker(2, 5), draw_speaker(2, 5, "plain")
    assert default.fixed_filters and not plain.fixed_filters
    assert all(np.array_equal(getattr(plain, f.name), getattr(default, f.name))  # the same speaker otherwise
               for f in dataclasses.fields(default) if f.name != "fixed_filters")
    varied, clean = draw_channel(2, 5, 1), draw_channel(2, 5, 1, "clean")
    assert (clean.f0_shift, clean.rate_scale, clean.level_db) == (varied.f0_shift, varied.rate_scale, varied.level_db)
    assert (clean.tilt_shift, clean.eq, clean.reverb_rt60, clean.lowpass, clean.snr_db) == (0.0, (), 0.0, np.inf, 50.0)

    base = utterance_audio(2, 5, 1, 3, seconds=(1.0, 1.0))
    assert np.array_equal(base, utterance_audio(2, 5, 1, 3, seconds=(1.0, 1.0), voices="default", channel="varied"))
    for variant in (dict(voices="plain"), dict(channel="clean")):
        other = utterance_audio(2, 5, 1, 3, seconds=(1.0, 1.0), **variant)
        assert other.shape == base.shape and not np.array_equal(other, base)

    summary = make_corpus(tmp_path / "c", seed=0, voices="plain", channel="clean", **TINY)
    settings = json.loads((Path(summary["out"]) / "corpus.json").read_text())["settings"]
    assert (settings["voices"], settings["channel"]) == ("plain", "clean")
    for bad in (dict(voices="loud"), dict(channel="studio")):
        with pytest.raises(SynthError, match="voices is one of default, plain, channel one of varied, clean"):
            make_corpus(tmp_path / "d", **{**TINY, **bad})


def test_a_clean_channel_has_no_noise_floor_to_speak_of():
    """The leading silence of a clean-channel utterance is at least 40 dB under its speech; a varied one is not."""
    def floor_db(pcm):
        x = pcm.astype(np.float64)
        return 10 * np.log10(np.mean(x[:400] ** 2) / np.mean(x ** 2))  # the first 25 ms: silence (50-250 ms)

    clean = [floor_db(utterance_audio(0, s, 0, 0, seconds=(1.0, 1.0), channel="clean")) for s in range(4)]
    varied = [floor_db(utterance_audio(0, s, 0, 0, seconds=(1.0, 1.0))) for s in range(4)]
    assert max(clean) < -40 < max(varied)


@pytest.mark.parametrize("bad, match", [
    (dict(videos=1), "videos"),
    (dict(utterances=1), "utterances"),
    (dict(test_speakers=4), "train speaker"),
    (dict(test_speakers=1), "test speakers"),
    (dict(seconds=(1.0, 0.5)), "seconds"),
])
def test_bad_arguments(tmp_path, bad, match):
    with pytest.raises(SynthError, match=match):
        make_corpus(tmp_path / "c", **{**TINY, **bad})


@pytest.mark.slow
def test_cli(tmp_path):
    out = tmp_path / "c"
    args = ["make-corpus", str(out), "--speakers", "3", "--utterances", "2", "--seed", "5",
            "--test-speakers", "2", "--min-seconds", "0.5", "--max-seconds", "0.6"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "1 train speakers" in result.output and "4 trials (2 target)" in result.output
    assert (out / "make-corpus.yaml").is_file()
    assert _files(out / "test") == _files(
        Path(make_corpus(tmp_path / "lib", seed=5, speakers=3, utterances=2, test_speakers=2,
                         seconds=(0.5, 0.6))["test_dir"]))
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert CliRunner().invoke(main, args + ["--overwrite"]).exit_code == 0


# ----------------------------------------------------------------------- separability


def _mel_filters(n_mels=40, n_fft=512, sr=16000) -> np.ndarray:
    """Triangular mel filters (n_mels, n_fft // 2 + 1)."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = hz(np.linspace(mel(20.0), mel(7600.0), n_mels + 2))
    f = np.fft.rfftfreq(n_fft, 1.0 / sr)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0.0, np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)))


def _mfcc_stats(path, filters) -> np.ndarray:
    """Mean and std of MFCC 1..19 over the louder half of the 25 ms frames. Returns (38,)."""
    x, _ = sf.read(path)
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160] * np.hamming(400)
    logmel = np.log(np.abs(np.fft.rfft(frames, 512)) ** 2 @ filters.T + 1e-8)  # (T, 40)
    energy = logmel.max(axis=1)
    mfcc = dct(logmel[energy > np.median(energy)], norm="ortho", axis=1)[:, 1:20]
    return np.concatenate([mfcc.mean(axis=0), mfcc.std(axis=0)])


def _cosine(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.sum(x[a] * x[b], axis=1)


def test_speakers_are_learnable_but_not_trivial(tmp_path):
    """Raw spectral statistics do not solve the trials; LDA fitted on train speakers does better."""
    # Seeds 0, 1, 2 of this size gave raw/LDA EER 0.375/0.153, 0.292/0.083, 0.222/0.069.
    summary = make_corpus(tmp_path / "c", seed=0, speakers=40, utterances=6, test_speakers=8,
                          seconds=(2.0, 3.0))
    out = Path(summary["out"])
    filters = _mel_filters()
    train = scan_tree(out / "train")
    x_train = np.stack([_mfcc_stats(u.path, filters) for u in train])  # (N, 38)
    y_train = np.array([u.speaker for u in train])
    trials = read_trials(out / "trials.txt")
    ids = sorted(set(trials.enroll) | set(trials.test))
    index = {u: i for i, u in enumerate(ids)}
    x_test = np.stack([_mfcc_stats(out / "test" / u, filters) for u in ids])
    a = np.array([index[u] for u in trials.enroll])
    b = np.array([index[u] for u in trials.test])

    # Raw baseline: cosine of the statistics, centred on the test set itself (no training).
    raw_eer, _ = eer(_cosine(x_test - x_test.mean(axis=0), a, b), trials.labels)

    # LDA: between- vs within-speaker scatter of the train speakers only.
    mu = x_train.mean(axis=0)
    xc = x_train - mu
    means = np.stack([xc[y_train == s].mean(axis=0) for s in np.unique(y_train)])
    within = sum((xc[y_train == s] - m).T @ (xc[y_train == s] - m)
                 for s, m in zip(np.unique(y_train), means)) / len(xc)
    between = means.T @ means / len(means)
    _, vecs = eigh(between, within + 1e-6 * np.eye(len(within)))
    proj = vecs[:, ::-1][:, : len(means) - 1]  # (38, speakers - 1), most discriminant first
    lda_eer, _ = eer(_cosine((x_test - mu) @ proj, a, b), trials.labels)

    print(f"raw EER {raw_eer:.3f}, LDA EER {lda_eer:.3f}")
    assert raw_eer > 0.08, "speakers are trivially separable by raw spectral statistics"
    assert lda_eer < 0.6 * raw_eer, "a trained projection should clearly beat raw statistics"
