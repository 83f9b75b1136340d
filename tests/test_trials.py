"""Trial list parsing: both layouts, both label styles, blank lines, bad lines."""

import numpy as np
import pytest

from mrlcache.trials import Trials, TrialsError, read_trials

A = "id10270/x6uYqmx31kE/00001.wav"
B = "id10270/8jEAjG6SegY/00008.wav"
C = "id10300/ize_eiCFEg0/00003.wav"


def write(tmp_path, text, name="trials.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_voxceleb_layout_numeric_labels(tmp_path):
    trials = read_trials(write(tmp_path, f"1 {A} {B}\n0 {A} {C}\n0 {B} {C}\n"))
    assert trials.labels.dtype == np.int8
    assert trials.labels.tolist() == [1, 0, 0]
    assert trials.enroll == [A, A, B]
    assert trials.test == [B, C, C]
    assert (trials.n_target, trials.n_nontarget, len(trials)) == (1, 2, 3)


def test_kaldi_layout_word_labels_and_blank_lines(tmp_path):
    text = f"\n{A} {B} target\n   \n{A} {C} nontarget\r\n\t{B} {C}  nontarget\n\n"
    trials = read_trials(write(tmp_path, text))
    assert trials.labels.tolist() == [1, 0, 0]
    assert trials.enroll == [A, A, B]
    assert trials.test == [B, C, C]


def test_voxceleb_layout_word_labels(tmp_path):
    trials = read_trials(write(tmp_path, f"target {A} {B}\nnontarget {C} {A}\n"))
    assert trials.labels.tolist() == [1, 0]
    assert trials.enroll == [A, C]


def test_utterances_first_appearance_order(tmp_path):
    trials = read_trials(write(tmp_path, f"1 {B} {A}\n0 {B} {C}\n0 {C} {A}\n"))
    assert trials.utterances == [B, A, C]


def test_indices_select_and_missing(tmp_path):
    trials = read_trials(write(tmp_path, f"1 {A} {B}\n0 {A} {C}\n0 {B} {C}\n"))
    rows = {C: 0, A: 1, B: 2}
    enroll, test = trials.indices(rows)
    assert enroll.tolist() == [1, 1, 2] and test.tolist() == [2, 0, 0]
    assert trials.missing({A, B}) == [C]
    with pytest.raises(TrialsError, match=r"1 trial utterance\(s\) have no embedding, e.g. .*00003"):
        trials.indices({A: 0, B: 1})
    kept = trials.select(np.array([True, False, True]))
    assert isinstance(kept, Trials)
    assert kept.labels.tolist() == [1, 0] and kept.test == [B, C]


@pytest.mark.parametrize(
    "text,lineno,message",
    [
        (f"1 {A} {B}\n\n1 {A}\n", 3, "expected 3 fields"),
        (f"1 {A} {B}\n0 {A} {B} extra\n", 2, "got 4"),
        (f"1 {A} {B}\nyes {A} {B}\n", 2, "label 'yes' in the first column"),
        (f"{A} {B} target\n{A} {B} maybe\n", 2, "label 'maybe' in the last column"),
        # A VoxCeleb line in a Kaldi-layout file is caught, not silently misread.
        (f"{A} {B} target\n1 {A} {B}\n", 2, "in the last column"),
        (f"{A} {B} {C}\n", 1, "no label"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, text, lineno, message):
    path = write(tmp_path, text)
    with pytest.raises(TrialsError, match=message) as info:
        read_trials(path)
    assert f"{path}:{lineno}:" in str(info.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(TrialsError, match="no trials"):
        read_trials(write(tmp_path, "\n  \n"))
    with pytest.raises(TrialsError, match="cannot read"):
        read_trials(tmp_path / "absent.txt")


def test_a_byte_order_mark_is_not_part_of_the_first_label(tmp_path):
    path = tmp_path / "trials.txt"
    path.write_bytes(f"1 {A} {B}\n0 {A} {C}\n".encode("utf-8-sig"))
    trials = read_trials(path)
    assert trials.labels.tolist() == [1, 0] and trials.enroll == [A, A]


def test_duplicate_trials_are_reported_in_either_order(tmp_path):
    trials = read_trials(write(tmp_path, f"1 {A} {B}\n0 {A} {C}\n1 {A} {B}\n\n0 {C} {A}\n"))
    assert len(trials) == 4  # kept: the file says what to score
    assert trials.duplicates == [(3, 1), (5, 2)]
    assert read_trials(write(tmp_path, f"1 {A} {B}\n0 {A} {C}\n")).duplicates == []


def test_a_pair_listed_with_both_labels_is_refused(tmp_path):
    with pytest.raises(TrialsError, match=r"trials\.txt:2: the pair .* is listed on line 1 with the opposite label"):
        read_trials(write(tmp_path, f"1 {A} {B}\n0 {B} {A}\n"))


@pytest.mark.parametrize("kaldi,sep,newline", [
    (False, " ", "\n"),  # the usual layout: the whole text split at once
    (True, " ", "\r\n"),
    (False, "\t", "\n"),  # other blanks: split line by line
    (True, "  ", "\n"),
    (False, " ", " \n"),  # a trailing space
])
def test_vectorised_reader_equals_the_line_by_line_reader(tmp_path, kaldi, sep, newline):
    from mrlcache.trials import _read_lines

    rng = np.random.default_rng(0)
    utts = [f"id{i % 7}/v{i}/{i:05d}.wav" for i in range(40)]
    lines = []
    for k in range(400):
        a, b = rng.integers(0, 40, 2)
        label = int(a % 7 == b % 7)
        if k % 97 == 5:
            lines.append("")  # blank lines keep the numbering
        lines.append(sep.join([utts[a], utts[b], "target" if label else "nontarget"]) if kaldi
                     else sep.join([str(label), utts[a], utts[b]]))
    path = tmp_path / "t.txt"
    path.write_bytes((newline.join(lines) + newline).encode())
    fast, slow = read_trials(path), _read_lines(path, path.read_text())
    assert fast.duplicates and fast.duplicates == slow.duplicates  # pairs repeat, in both orders
    assert np.array_equal(fast.labels, slow.labels) and fast.enroll == slow.enroll and fast.test == slow.test
    fresh = Trials(fast.labels, fast.enroll, fast.test)  # utterances computed the plain way
    assert fast.utterances == fresh.utterances == slow.utterances
    # Each side's position in utterances, from the reader's ids and the plain way alike.
    for side, ids in zip(fast.sides, (fast.enroll, fast.test)):
        assert [fast.utterances[i] for i in side] == ids
    assert all(np.array_equal(a, b) for a, b in zip(fast.sides, fresh.sides))
    assert fast.self_trials == [i for i, (e, t) in enumerate(zip(fast.enroll, fast.test)) if e == t]
    rows = {u: 3 * i + 1 for i, u in enumerate(reversed(fast.utterances))}
    ie, it = fast.indices(rows)
    assert ie.tolist() == [rows[u] for u in fast.enroll] and it.tolist() == [rows[u] for u in fast.test]


@pytest.mark.parametrize("text,lineno", [("1 a b c\n1 d\n", 1), ("1 a b\n1 c d e\n0 f\n", 2),
                                         ("1 a b\n1  c\n\n0 d e\n", 2), ("1 a b\n\n0 c\td e\n1 f\n", 3)])
def test_lines_of_other_field_counts_are_found_whatever_the_total(tmp_path, text, lineno):
    """Three fields per line on average is not enough: the first line of another count is named."""
    with pytest.raises(TrialsError, match=rf"trials\.txt:{lineno}: expected 3 fields"):
        read_trials(write(tmp_path, text))
