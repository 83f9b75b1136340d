"""Corpora as utterance records: a VoxCeleb-style speaker tree, a list file, or Kaldi files.

Every reader returns ``list[Utterance]``. An utterance id is the path relative to the data
root with '/' separators *including* the extension, because VoxCeleb trial lists name
files that way (``id10270/x6uYqmx31kE/00001.wav``). No reader opens audio: decoding
problems are found (and recorded) by the extractor, so that a scan stays quick on a
million files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# wav/flac go through libsndfile, the others through PyAV (FFmpeg); see mrlcache.audio.
AUDIO_EXTENSIONS = (".wav", ".flac", ".m4a", ".mp3", ".ogg", ".opus")


class CorpusError(ValueError):
    """A data root, list or Kaldi file that cannot be turned into utterance records."""


@dataclass(frozen=True, slots=True)
class Utterance:
    """One audio file: its id (relative path with '/'), absolute path and speaker label."""

    utt_id: str
    path: str
    speaker: str


def _is_audio(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS)


def scan_tree(root: str | os.PathLike) -> list[Utterance]:
    """List the audio files of a ``speaker/video/utterance.{wav,flac,m4a,mp3,ogg,opus}`` tree.

    Any depth below the speaker folder is accepted; the speaker is the first folder.
    Names starting with '.' are skipped (hidden folders, macOS ``._x.wav`` resource
    files, which are not audio). Extensions match case-insensitively. Symbolic links to
    folders are followed, except one that points back to a folder above it (a loop).

    Args:
        root: the data root.
    Returns:
        utterances sorted by ``utt_id``.
    Raises:
        CorpusError: root missing, no audio below it, audio directly in root (it would
            have no speaker folder), or a symbolic link loop.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise CorpusError(f"{root}: data root does not exist or is not a folder")
    found: list[Utterance] = []
    # Breadth of VoxCeleb2 is ~1.1M files in ~150k folders: os.scandir gives the entry
    # type from the directory listing itself (d_type), so no stat per file is needed.
    with os.scandir(root) as top:
        entries = list(top)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            _walk(entry.path, entry.name + "/", entry.name, found)
        elif _is_audio(entry.name):
            raise CorpusError(
                f"{entry.path}: audio file directly in the data root has no speaker folder; "
                "move it into SPEAKER/... or pass a list file"
            )
    if not found:
        raise CorpusError(
            f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found below the data root; "
            "expected SPEAKER/VIDEO/UTTERANCE.wav"
        )
    found.sort(key=lambda u: u.utt_id)
    return found


def _walk(folder: str, prefix: str, speaker: str, found: list[Utterance]) -> None:
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if entry.is_symlink():
                    _refuse_loop(entry.path, folder)
                _walk(entry.path, prefix + entry.name + "/", speaker, found)
            elif _is_audio(entry.name):
                found.append(Utterance(prefix + entry.name, entry.path, speaker))


def _refuse_loop(link: str, folder: str) -> None:
    """A linked folder that is ``folder`` or one above it would be walked forever."""
    target, here = os.path.realpath(link), os.path.realpath(folder)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        raise CorpusError(f"{link}: symbolic link loop (it points to {target}, a folder above it); remove the link")


def _speaker_from_id(utt_id: str, where: str) -> str:
    head, sep, _ = utt_id.partition("/")
    if not sep or not head:
        raise CorpusError(
            f"{where}: no speaker given and utterance id {utt_id!r} has no 'speaker/' prefix; "
            "add a speaker column"
        )
    return head


def _lines(path: Path):
    """Yield (line_number, fields) of the non-blank, non-comment lines of a text file."""
    try:
        from mrlcache.runtime import read_text

        text = read_text(path, "utf-8-sig")  # a byte-order mark (Windows editors) is not data
    except (OSError, UnicodeDecodeError) as err:
        raise CorpusError(f"{path}: cannot read ({err})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def read_list(path: str | os.PathLike) -> list[Utterance]:
    """Read a list file of lines ``utt_id path [speaker]``.

    Fields are separated by whitespace (paths with spaces are not supported). Relative
    paths are resolved against the list file's folder; the speaker defaults to the first
    '/' component of ``utt_id``. Blank lines and lines starting with '#' are skipped.

    Args:
        path: the list file.
    Returns:
        utterances in file order.
    Raises:
        CorpusError: unreadable file, malformed line or duplicate id (with line numbers).
    """
    path = Path(path)
    base = os.path.dirname(os.path.abspath(path))
    out: list[Utterance] = []
    seen: dict[str, int] = {}
    for number, line in _lines(path):
        fields = line.split()
        where = f"{path}:{number}"
        if len(fields) not in (2, 3):
            raise CorpusError(
                f"{where}: expected 'utt_id path [speaker]', got {len(fields)} fields: {line!r}"
            )
        utt_id, audio = fields[0], fields[1]
        if utt_id in seen:
            raise CorpusError(
                f"{where}: duplicate utterance id {utt_id!r} (first on line {seen[utt_id]})"
            )
        seen[utt_id] = number
        speaker = fields[2] if len(fields) == 3 else _speaker_from_id(utt_id, where)
        out.append(Utterance(utt_id, os.path.normpath(os.path.join(base, audio)), speaker))
    if not out:
        raise CorpusError(f"{path}: list file holds no utterances")
    return out


def _read_pairs(path: Path, what: str) -> dict[str, tuple[str, int]]:
    """Read ``key rest-of-line`` pairs; returns key -> (value, line_number)."""
    pairs: dict[str, tuple[str, int]] = {}
    for number, line in _lines(path):
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            raise CorpusError(f"{path}:{number}: expected '{what}', got {line!r}")
        key, value = fields[0], fields[1].strip()
        if key in pairs:
            raise CorpusError(
                f"{path}:{number}: duplicate utterance id {key!r} (first on line {pairs[key][1]})"
            )
        pairs[key] = (value, number)
    return pairs


def read_kaldi(
    wav_scp: str | os.PathLike, utt2spk: str | os.PathLike | None = None
) -> list[Utterance]:
    """Read a Kaldi data folder's ``wav.scp`` (``utt path``) and ``utt2spk`` (``utt speaker``).

    Relative paths in ``wav.scp`` are resolved against the current directory, as Kaldi
    does. Piped commands (``sox x.wav -t wav - |``) are refused: run them once and list
    the resulting files. Without ``utt2spk``, the file ``utt2spk`` next to ``wav.scp`` is
    used if it exists, else the speaker is the first '/' component of each id.

    Args:
        wav_scp: the ``wav.scp`` file.
        utt2spk: the ``utt2spk`` file, or None (see above).
    Returns:
        utterances in ``wav.scp`` order.
    Raises:
        CorpusError: malformed or duplicate lines, piped commands, missing speakers.
    """
    wav_scp = Path(wav_scp)
    pairs = _read_pairs(wav_scp, "utt_id path")
    if not pairs:
        raise CorpusError(f"{wav_scp}: wav.scp holds no utterances")
    if utt2spk is None and (wav_scp.parent / "utt2spk").is_file():
        utt2spk = wav_scp.parent / "utt2spk"
    speakers = _read_pairs(Path(utt2spk), "utt_id speaker") if utt2spk is not None else None
    out: list[Utterance] = []
    for utt_id, (audio, number) in pairs.items():
        where = f"{wav_scp}:{number}"
        if audio.endswith("|"):
            raise CorpusError(
                f"{where}: piped command {audio!r} is not supported; write the audio to files "
                "and list those instead"
            )
        if speakers is None:
            speaker = _speaker_from_id(utt_id, where)
        elif utt_id in speakers:
            speaker = speakers[utt_id][0]
            if len(speaker.split()) != 1:
                raise CorpusError(
                    f"{utt2spk}:{speakers[utt_id][1]}: expected 'utt_id speaker', got extra fields"
                )
        else:
            raise CorpusError(f"{where}: utterance {utt_id!r} has no line in {utt2spk}")
        out.append(Utterance(utt_id, os.path.abspath(audio), speaker))
    return out
