"""Shared test builders: synthetic speech, audio writers, tiny corpora, broken files.

Import them in any test module with ``from conftest import speech_like, make_tree, ...``
(pytest puts ``tests/`` on ``sys.path``). Everything is small and deterministic: the same
arguments write the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

# Under pytest-xdist (``-n 2``, the README's test command) the workers share the cores: one
# torch thread each, as two processes of 2 threads on 2 cores only wait for each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _same_threads_for_every_test():
    """Every test starts with the session's torch thread count: ``extract --threads 1`` run
    in-process sets it for the whole process, and CPU kernels reduce in a thread-dependent
    order, so without this a fit's numbers would depend on which tests ran before."""
    torch.set_num_threads(_THREADS)
    yield
    torch.set_num_threads(_THREADS)


@pytest.fixture(autouse=True, scope="session")
def _one_engine_cache_per_session(tmp_path_factory):
    """Exported onnxruntime engines (``--engine onnxruntime``) go to one folder for the whole
    session, never the user's cache: a backbone one test exported (tens of seconds for a b0)
    is read from disk by the next test with the same weights, as a user's second run reads
    it. Under pytest-xdist the workers share the folder. Tests of the cache itself give their
    own ``cache_dir``."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, shared by the workers (engines are written atomically)
    folder = root / "engines"
    folder.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MRLCACHE_ENGINE_CACHE", str(folder))
        yield


# broken_files() writes a "too_short" file of 0.25 s: it is too short for any
# min_seconds above this value and long enough for none of the other checks to fire.
BROKEN_MIN_SECONDS = 0.5

# A tiny ReDimNet configuration (fast) with strides 2 and 3, a conv_exp squeeze, fwSE blocks
# and a stage without time-context block; the published sizes are covered by the fixtures.
TINY = {
    "F": 12, "C": 4, "block_1d_type": "conv+att", "block_2d_type": "basic_resnet_fwse",
    "group_divisor": 2, "global_context_att": True,
    "stages_setup": [(1, 1, 1, [(3, 3)], None), (2, 1, 2, [(3, 3)], 4), (3, 1, 1, [(3, 3)], 4)],
}


def speech_like(seconds: float, sr: int = 16000, seed: int = 0, f0: float = 120.0) -> np.ndarray:
    """A voiced, speech-like buzz: harmonics of a wobbling f0 under a syllable envelope.

    Returns:
        (round(seconds * sr),) float32 with peak 0.5.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    # f0 drifts by a few percent (intonation); the phase is the integral of frequency.
    pitch = f0 * (1 + 0.04 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t + rng.uniform(0, 6.3)))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    wave = np.zeros(n)
    for k in range(1, int(min(4000.0, 0.45 * sr) // f0) + 1):
        wave += np.sin(k * phase + rng.uniform(0, 6.3)) / k
    # ~4 syllables per second, never fully silent (so no file built here is "silent").
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t + rng.uniform(0, 6.3))
    wave = wave * envelope + 0.01 * rng.standard_normal(n)
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def _prepare(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_wav(path, wave: np.ndarray, sr: int, subtype: str = "PCM_16") -> Path:
    """Write a wav file; ``wave`` is (T,) or (T, channels)."""
    path = _prepare(path)
    sf.write(path, wave, sr, subtype=subtype, format="WAV")
    return path


def write_flac(path, wave: np.ndarray, sr: int, subtype: str = "PCM_16") -> Path:
    """Write a flac file; ``wave`` is (T,) or (T, channels)."""
    path = _prepare(path)
    sf.write(path, wave, sr, subtype=subtype, format="FLAC")
    return path


def write_m4a(path, wave: np.ndarray, sr: int, faststart: bool = False) -> Path:
    """Write AAC in an MP4 container (VoxCeleb2's format) with PyAV.

    ``wave`` is (T,) or (T, channels). ``faststart`` puts the index (moov) first, as
    streaming files do; then a cut file still opens and fails mid-stream.
    """
    import av

    path = _prepare(path)
    wave = np.asarray(wave, dtype=np.float32)
    planes = wave[None, :] if wave.ndim == 1 else np.ascontiguousarray(wave.T)  # (C, T)
    layout = "mono" if planes.shape[0] == 1 else "stereo"
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as out:
        stream = out.add_stream("aac", rate=sr, layout=layout)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


_WRITERS = {"wav": write_wav, "flac": write_flac, "m4a": write_m4a}


def make_tree(
    root,
    speakers: int = 3,
    videos: int = 2,
    utts: int = 2,
    seconds: float = 1.5,
    formats: tuple[str, ...] = ("wav",),
    rates: tuple[int, ...] = (16000,),
    channels: int = 1,
) -> list[Path]:
    """Write a tiny VoxCeleb-style corpus ``root/idNNNNN/vNN/NNNNN.ext``.

    Formats and sample rates cycle over the utterances in writing order; each speaker
    has its own f0, each file its own seed. Stereo files (``channels=2``) hold the same
    voice at two levels.

    Returns:
        the written paths, sorted.
    """
    root = Path(root)
    paths = []
    index = 0
    for s in range(speakers):
        for v in range(videos):
            for u in range(utts):
                fmt = formats[index % len(formats)]
                sr = rates[index % len(rates)]
                wave = speech_like(seconds, sr=sr, seed=1000 * s + 10 * v + u, f0=90.0 + 23.0 * s)
                if channels > 1:
                    wave = np.stack([wave * (1.0 - 0.2 * c) for c in range(channels)], axis=1)
                path = root / f"id{10001 + s}" / f"v{v:02d}" / f"{u + 1:05d}.{fmt}"
                paths.append(_WRITERS[fmt](path, wave, sr))
                index += 1
    return sorted(paths)


def broken_files(root) -> dict[Path, str]:
    """Write one file per failure kind under ``root/id99999/broken/`` (a speaker folder,
    so it can sit inside a make_tree corpus).

    Returns:
        {path: expected AudioError reason}; "too_short" holds for any
        ``min_seconds >= BROKEN_MIN_SECONDS``.
    """
    folder = Path(root) / "id99999" / "broken"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}

    path = folder / "not_audio.wav"
    path.write_bytes(b"this is a text file, not a RIFF header\n" * 20)
    out[path] = "unreadable"

    out[write_wav(folder / "empty.wav", np.zeros(0, np.float32), 16000)] = "empty"

    path = write_wav(folder / "truncated.wav", speech_like(1.0, seed=7), 16000)
    data = path.read_bytes()
    path.write_bytes(data[: 44 + (len(data) - 44) // 2])  # header says 1 s, half is there
    out[path] = "truncated"

    out[write_wav(folder / "silent.wav", np.zeros(16000, np.float32), 16000)] = "silent"
    out[write_wav(folder / "too_short.wav", speech_like(0.25, seed=8), 16000)] = "too_short"
    return out


class CodePayload:
    """Unpickling this runs ``touch MARKER``: what a crafted file carrying code would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def crafted_files(tmp_path, wrap):
    """A torch file of ``wrap(payload)`` and a plain protocol-2 pickle of ``{"x": payload}``;
    loading either would create ``tmp_path/ran``. Returns (marker path, [torch file, pickle])."""
    import pickle

    import torch

    marker = tmp_path / "ran"
    torch.save(wrap(CodePayload(marker)), tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"x": CodePayload(marker)}, f, protocol=2)
    assert not marker.exists()  # writing them ran nothing
    return marker, [tmp_path / "evil.pt", tmp_path / "evil.pkl"]


def tiny_head_args(name: str, dims, width=None, options=None) -> dict:
    """Constructor arguments of registered head ``name`` for a tiny test model: its width (if
    given), dims, its own options, and any other required argument (e.g. a started head's
    ``embed_dim``) set to twice the largest dim."""
    import inspect

    from mrlcache.models import head_args, head_class

    cls = head_class(name)
    args = {"dims": list(dims), **cls.option_args(options)} if width is None else head_args(name, width, dims, options)
    for p in list(inspect.signature(cls).parameters.values()):
        if p.default is p.empty and p.name not in args and p.name != cls.width_arg:
            args[p.name] = 2 * max(dims)
    return args


def error_line(result) -> str:
    """The one 'Error:' line click printed for a CliRunner result; fails on a success or a
    traceback (any exception but SystemExit)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]
