"""Corpus readers: speaker trees, list files and Kaldi data folders, with their errors."""

import os

import pytest
from conftest import make_tree

from mrlcache.corpus import CorpusError, Utterance, read_kaldi, read_list, scan_tree


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_scan_tree_ids_speakers_and_order(tmp_path):
    formats = ("wav", "flac", "m4a")
    paths = make_tree(tmp_path, speakers=2, videos=2, utts=2, seconds=0.1, formats=formats)
    utts = scan_tree(tmp_path)
    assert [u.utt_id for u in utts] == sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    first = "id10001/v00/00001.wav"
    assert utts[0] == Utterance(first, str(tmp_path / first), "id10001")
    assert {u.utt_id.rsplit(".", 1)[1] for u in utts} == {"wav", "flac", "m4a"}
    assert all(u.speaker == u.utt_id.split("/")[0] for u in utts)
    assert all(os.path.isabs(u.path) and os.path.isfile(u.path) for u in utts)


def test_scan_tree_depth_case_and_skips(tmp_path):
    _touch(tmp_path / "spk" / "a.WAV")  # depth 1 below speaker, upper-case extension
    _touch(tmp_path / "spk" / "x" / "y" / "z" / "b.flac")  # deeper
    _touch(tmp_path / "spk" / "notes.txt")  # not audio
    _touch(tmp_path / "spk" / "._a.wav")  # macOS resource file, not audio
    _touch(tmp_path / ".trash" / "v" / "c.wav")  # hidden folder
    _touch(tmp_path / "README.md")  # non-audio in root is fine
    assert [(u.utt_id, u.speaker) for u in scan_tree(tmp_path)] == [
        ("spk/a.WAV", "spk"),
        ("spk/x/y/z/b.flac", "spk"),
    ]


def test_scan_tree_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        scan_tree(tmp_path / "missing")
    _touch(tmp_path / "spk" / "v" / "notes.txt")
    with pytest.raises(CorpusError, match="no audio files"):
        scan_tree(tmp_path)
    _touch(tmp_path / "loose.wav")
    with pytest.raises(CorpusError, match="loose.wav.*no speaker folder"):
        scan_tree(tmp_path)


def test_utterance_is_frozen_with_slots():
    u = Utterance("a/b.wav", "/x/a/b.wav", "a")
    with pytest.raises(AttributeError):
        u.speaker = "b"
    assert not hasattr(u, "__dict__")


def test_read_list_resolves_paths_and_speakers(tmp_path):
    lst = tmp_path / "lists" / "train.lst"
    lst.parent.mkdir()
    lst.write_text(
        "# utt path speaker\n"
        "\n"
        "id1/v/1.wav ../audio/1.wav\n"
        "   id2/v/2.wav   /abs/2.flac   spkB  \n"
        "plain3 rel/3.m4a spkC\n"
    )
    utts = read_list(lst)
    assert utts == [
        Utterance("id1/v/1.wav", str(tmp_path / "audio" / "1.wav"), "id1"),
        Utterance("id2/v/2.wav", "/abs/2.flac", "spkB"),
        Utterance("plain3", str(tmp_path / "lists" / "rel" / "3.m4a"), "spkC"),
    ]


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("a/1.wav x.wav\nonlyone\n", 2, "expected 'utt_id path"),
        ("a/1.wav x.wav s\n\n# c\na/2.wav y.wav s extra\n", 4, "4 fields"),
        ("a/1.wav x\na/2.wav y\na/1.wav z\n", 3, "duplicate .*'a/1.wav' .first on line 1"),
        ("noslash x.wav\n", 1, "no 'speaker/' prefix"),
    ],
)
def test_read_list_errors_name_file_and_line(tmp_path, text, line, message):
    lst = tmp_path / "bad.lst"
    lst.write_text(text)
    with pytest.raises(CorpusError, match=rf"bad\.lst:{line}: .*{message}"):
        read_list(lst)


def test_read_list_empty_or_missing(tmp_path):
    lst = tmp_path / "empty.lst"
    lst.write_text("# nothing\n\n")
    with pytest.raises(CorpusError, match="holds no utterances"):
        read_list(lst)
    with pytest.raises(CorpusError, match="cannot read"):
        read_list(tmp_path / "missing.lst")


def test_read_kaldi_with_utt2spk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text("u2 /corpus/with space/2.wav\nu1 wav/1.wav\n")
    (data / "utt2spk").write_text("u1 spkA\nu2 spkB\nu9 spkZ\n")  # extra lines are harmless
    expected = [
        Utterance("u2", "/corpus/with space/2.wav", "spkB"),
        Utterance("u1", str(tmp_path / "wav" / "1.wav"), "spkA"),  # relative to cwd, as Kaldi
    ]
    assert read_kaldi(data / "wav.scp", data / "utt2spk") == expected
    assert read_kaldi(data / "wav.scp") == expected  # sibling utt2spk picked up


def test_read_kaldi_without_utt2spk_uses_id_prefix(tmp_path):
    scp = tmp_path / "wav.scp"
    scp.write_text("id1/v/1.wav /c/id1/v/1.wav\n")
    assert read_kaldi(scp) == [Utterance("id1/v/1.wav", "/c/id1/v/1.wav", "id1")]


def test_read_kaldi_errors(tmp_path):
    scp = tmp_path / "wav.scp"
    scp.write_text("u1 /a/1.wav\nu2 sox /a/2.wav -t wav - |\n")
    spk = tmp_path / "spk"
    spk.write_text("u1 s\nu2 s\n")
    with pytest.raises(CorpusError, match=r"wav\.scp:2: piped command .*not supported"):
        read_kaldi(scp, spk)
    scp.write_text("u1 /a/1.wav\nu1 /a/2.wav\n")
    with pytest.raises(CorpusError, match=r"wav\.scp:2: duplicate utterance id 'u1'"):
        read_kaldi(scp, spk)
    scp.write_text("u1 /a/1.wav\nu3 /a/3.wav\n")
    with pytest.raises(CorpusError, match=r"wav\.scp:2: utterance 'u3' has no line in .*spk"):
        read_kaldi(scp, spk)
    scp.write_text("u1\n")
    with pytest.raises(CorpusError, match=r"wav\.scp:1: expected 'utt_id path'"):
        read_kaldi(scp, spk)


def test_a_byte_order_mark_in_a_list_file_is_ignored(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes("id1/v/1.wav /c/1.wav\nid2/v/2.wav /c/2.wav\n".encode("utf-8-sig"))
    assert [u.utt_id for u in read_list(lst)] == ["id1/v/1.wav", "id2/v/2.wav"]
    scp = tmp_path / "wav.scp"
    scp.write_bytes("u1 /a/1.wav\n".encode("utf-8-sig"))
    (tmp_path / "spk").write_bytes("u1 s\n".encode("utf-8-sig"))
    assert read_kaldi(scp, tmp_path / "spk") == [Utterance("u1", "/a/1.wav", "s")]


def test_a_symbolic_link_loop_in_the_tree_is_refused_by_name(tmp_path):
    (tmp_path / "id1" / "v").mkdir(parents=True)
    (tmp_path / "id1" / "v" / "1.wav").write_bytes(b"")
    (tmp_path / "id1" / "v" / "again").symlink_to(tmp_path / "id1")
    with pytest.raises(CorpusError, match=r"id1/v/again: symbolic link loop"):
        scan_tree(tmp_path)


def test_a_symbolic_link_to_another_folder_is_followed(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "1.wav").write_bytes(b"")
    (tmp_path / "data" / "id1").mkdir(parents=True)
    (tmp_path / "data" / "id1" / "v").symlink_to(tmp_path / "elsewhere")
    assert [u.utt_id for u in scan_tree(tmp_path / "data")] == ["id1/v/1.wav"]


def test_mp3_ogg_and_opus_files_are_scanned(tmp_path):
    for name in ("1.wav", "2.mp3", "3.OGG", "4.opus", "5.txt"):
        (tmp_path / "id1" / "v").mkdir(parents=True, exist_ok=True)
        (tmp_path / "id1" / "v" / name).write_bytes(b"")
    assert [u.utt_id for u in scan_tree(tmp_path)] == ["id1/v/1.wav", "id1/v/2.mp3", "id1/v/3.OGG", "id1/v/4.opus"]
