"""The synthetic multi-speaker corpus in VoxCeleb layout, with its trial list.

The voices come from :mod:`mrlcache.demo.voice` (a source-filter model); this module
draws the video ids, writes the wav files, the trial list and ``corpus.json``, and refuses
to overwrite anything that is not a previous corpus. Same seed -> same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

from mrlcache import __version__
from mrlcache.demo.voice import _TRIALS, _VIDEO, CHANNELS, VOICES, _rng, utterance_audio

CORPUS_FORMAT = "mrlcache-synth-corpus"
CORPUS_VERSION = 1
FIRST_SPEAKER = 10001  # VoxCeleb-like ids: id10001, id10002, ...
_VIDEO_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


class SynthError(ValueError):
    """Bad arguments for the corpus or an output directory that must not be overwritten."""


def _video_ids(seed: int, speaker: int, videos: int) -> list[str]:
    rng = _rng(seed, _VIDEO, speaker, 1_000_000)  # its own stream, apart from the channels
    ids: list[str] = []
    while len(ids) < videos:
        vid = "".join(rng.choice(_VIDEO_ALPHABET, 11))
        if vid not in ids:
            ids.append(vid)
    return ids


def speaker_id(index: int) -> str:
    """VoxCeleb-like id of speaker ``index`` (0-based): id10001, id10002, ..."""
    return f"id{FIRST_SPEAKER + index:05d}"


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    meta_path = out / "corpus.json"
    previous = False
    if meta_path.is_file():
        try:
            previous = json.loads(meta_path.read_text()).get("format") == CORPUS_FORMAT
        except (OSError, ValueError):
            previous = False
    if not previous:
        raise SynthError(f"{out}: directory is not empty and holds no synthetic corpus "
                          "(no corpus.json); choose an empty or new directory")
    if not overwrite:
        raise SynthError(f"{out}: already holds a synthetic corpus; pass overwrite=True "
                          "(--overwrite) to replace it")
    for name in ("train", "test"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("trials.txt", "corpus.json"):
        (out / name).unlink(missing_ok=True)


def _make_trials(seed: int, test_utts: dict[str, list[tuple[int, str]]],
                 per_speaker: int | None) -> list[tuple[int, str, str]]:
    """Balanced trials: per test speaker, cross-video target pairs and as many non-targets.

    test_utts: speaker id -> [(video index, utt_id relative to OUT/test)]. Returns sorted
    (label, enroll, test) tuples.
    """
    rng = _rng(seed, _TRIALS)
    speakers = sorted(test_utts)
    trials: list[tuple[int, str, str]] = []
    seen: set[frozenset] = set()
    for spk in speakers:
        utts = test_utts[spk]
        pairs = [(a[1], b[1]) for i, a in enumerate(utts) for b in utts[i + 1:] if a[0] != b[0]]
        if per_speaker is None:
            chosen = pairs
        else:
            if per_speaker > len(pairs):
                raise SynthError(f"trials_per_speaker={per_speaker} but speaker {spk} has only "
                                  f"{len(pairs)} cross-video utterance pairs; lower it or add utterances")
            chosen = [pairs[i] for i in sorted(rng.choice(len(pairs), per_speaker, replace=False))]
        trials += [(1, a, b) for a, b in chosen]
        others = [u for s in speakers if s != spk for _, u in test_utts[s]]
        # Non-targets: enrol this speaker's utterances against other speakers', no pair twice.
        needed = len(chosen)
        if needed > len(utts) * len(others):
            raise SynthError(f"speaker {spk}: cannot draw {needed} distinct non-target trials")
        while needed:
            a = utts[rng.integers(len(utts))][1]
            b = others[rng.integers(len(others))]
            if frozenset((a, b)) not in seen:
                seen.add(frozenset((a, b)))
                trials.append((0, a, b))
                needed -= 1
    return sorted(trials, key=lambda t: (t[1], t[2]))


def make_corpus(out, speakers: int = 40, utterances: int = 8, seed: int = 0,
                test_speakers: int | None = None, videos: int = 2,
                seconds: tuple[float, float] = (2.0, 4.0), sample_rate: int = 16000,
                trials_per_speaker: int | None = None, voices: str = "default", channel: str = "varied",
                overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a synthetic corpus in VoxCeleb layout and its trial list.

    Layout: ``OUT/{train,test}/idNNNNN/VIDEO/NNNNN.wav`` (16-bit PCM), ``OUT/trials.txt``
    (``label enroll test`` with paths relative to ``OUT/test``), ``OUT/corpus.json``.
    Speakers ``0 .. speakers-test_speakers-1`` are train, the last ``test_speakers`` test.
    Utterance ``u`` of a speaker is recorded in video ``u % videos``.

    Args:
        out: output directory; must be new, empty, or (with ``overwrite``) a previous corpus.
        speakers: total number of speakers.
        utterances: utterances per speaker (spread over its videos).
        seed: everything is a function of it.
        test_speakers: number of test speakers (default: a quarter, at least 2).
        videos: videos (recording channels) per speaker, at least 2 (target trials cross videos).
        seconds: (min, max) utterance duration, drawn uniformly.
        trials_per_speaker: target trials per test speaker (as many non-targets are added);
            None uses every cross-video pair.
        voices: ``default``, or ``plain`` (no fixed speaker resonance and antiresonance).
        channel: ``varied`` (room, EQ, band limit, noise, vocal effort per video), or
            ``clean`` (every video recorded alike). ``plain`` voices on a ``clean`` channel
            are the corpus on which encoders trained on real speech beat random ones
            (see :mod:`mrlcache.demo.voice`).
        overwrite: replace a previous corpus in ``out``.
        progress: called as ``progress(done_speakers, total_speakers)``.

    Returns:
        a summary dict (counts, audio seconds, paths).
    """
    out = Path(out)
    if test_speakers is None:
        test_speakers = max(2, round(speakers * 0.25))
    if test_speakers < 2 or speakers - test_speakers < 1:
        raise SynthError(f"need at least 2 test speakers and 1 train speaker, got speakers={speakers}, "
                          f"test_speakers={test_speakers}")
    if videos < 2:
        raise SynthError(f"videos={videos}: need at least 2 videos per speaker "
                          "for cross-video target trials")
    if utterances < videos:
        raise SynthError(f"utterances={utterances} < videos={videos}: every video needs an utterance")
    if not 0 < seconds[0] <= seconds[1]:
        raise SynthError(f"seconds={seconds}: need 0 < min <= max")
    if sample_rate < 8000:
        raise SynthError(f"sample_rate={sample_rate}: need at least 8000 Hz")
    if seed < 0:
        raise SynthError(f"seed={seed}: need a non-negative integer")
    if voices not in VOICES or channel not in CHANNELS:
        raise SynthError(f"voices={voices!r}, channel={channel!r}: voices is one of {', '.join(VOICES)}, "
                         f"channel one of {', '.join(CHANNELS)}")
    _check_out(out, overwrite)

    num_train = speakers - test_speakers
    test_utts: dict[str, list[tuple[int, str]]] = {}
    counts = {"train": 0, "test": 0}
    samples = 0
    for s in range(speakers):
        split = "train" if s < num_train else "test"
        sid = speaker_id(s)
        vids = _video_ids(seed, s, videos)
        for u in range(utterances):
            v = u % videos
            rel = f"{sid}/{vids[v]}/{u // videos + 1:05d}.wav"
            path = out / split / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pcm = utterance_audio(seed, s, v, u, seconds=seconds, sample_rate=sample_rate, voices=voices,
                                  channel=channel)
            sf.write(path, pcm, sample_rate, subtype="PCM_16")
            samples += len(pcm)
            counts[split] += 1
            if split == "test":
                test_utts.setdefault(sid, []).append((v, rel))
        if progress is not None:
            progress(s + 1, speakers)

    trials = _make_trials(seed, test_utts, trials_per_speaker)
    (out / "trials.txt").write_text("".join(f"{lab} {a} {b}\n" for lab, a, b in trials))
    settings = {
        "speakers": speakers, "utterances": utterances, "seed": seed,
        "test_speakers": test_speakers, "videos": videos, "seconds": list(seconds),
        "sample_rate": sample_rate, "trials_per_speaker": trials_per_speaker,
        "voices": voices, "channel": channel,
    }
    meta = {
        "format": CORPUS_FORMAT, "version": CORPUS_VERSION, "mrlcache_version": __version__,
        "settings": settings,
        "train_speakers": [speaker_id(s) for s in range(num_train)],
        "test_speakers": [speaker_id(s) for s in range(num_train, speakers)],
    }
    (out / "corpus.json").write_text(json.dumps(meta, indent=1) + "\n")
    targets = sum(t[0] for t in trials)
    return {
        "out": str(out), "train_dir": str(out / "train"), "test_dir": str(out / "test"),
        "trials_path": str(out / "trials.txt"),
        "train_speakers": num_train, "test_speakers": test_speakers,
        "train_utterances": counts["train"], "test_utterances": counts["test"],
        "audio_seconds": samples / sample_rate,
        "trials": len(trials), "target_trials": targets, "nontarget_trials": len(trials) - targets,
    }
