"""Verification trial lists: which pairs of utterances to score, and which are targets.

Two layouts are read, told apart by which column holds the label:

* VoxCeleb (``veri_test2.txt``, ``list_test_all2.txt``, ``list_test_hard2.txt``):
  ``LABEL ENROLL TEST``, e.g. ``1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav``;
* Kaldi / WeSpeaker (``vox1_O_cleaned.kaldi``): ``ENROLL TEST LABEL``.

A label is ``1``/``0`` or ``target``/``nontarget``. Utterance ids are paths relative to the
audio root, with extension, exactly as :mod:`mrlcache.corpus` names them. Blank lines and
a byte-order mark are ignored; anything else that does not parse is an error naming the
file and line. A pair listed twice (in either order) is kept and reported in
``Trials.duplicates`` (it weighs twice in every metric); twice with opposite labels is an
error.
"""

from __future__ import annotations

import gc
import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

LABELS = {"1": 1, "0": 0, "target": 1, "nontarget": 0}


class TrialsError(ValueError):
    """A trial list that cannot be read or used."""


@dataclass
class Trials:
    """A list of verification trials.

    labels: (T,) int8, 1 = same speaker (target), 0 = different (non-target).
    enroll, test: T utterance ids each.
    duplicates: (line, first line) of each trial that repeats an earlier pair.
    """

    labels: np.ndarray
    enroll: list[str]
    test: list[str]
    duplicates: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.size)

    @cached_property
    def utterances(self) -> list[str]:
        """Unique utterance ids in order of first appearance (enroll before test per trial).

        Computed once per Trials (eer reads it several times; 550,000 trials take a second).
        """
        seen = dict.fromkeys(u for pair in zip(self.enroll, self.test) for u in pair)
        return list(seen)

    @cached_property
    def sides(self) -> tuple[np.ndarray, np.ndarray]:
        """Each trial's enroll and test utterance as positions in :attr:`utterances`, (T,) int64 each.

        Computed once per Trials (the vectorised reader has them already).
        """
        at = {u: i for i, u in enumerate(self.utterances)}
        return (np.fromiter(map(at.__getitem__, self.enroll), dtype=np.int64, count=len(self)),
                np.fromiter(map(at.__getitem__, self.test), dtype=np.int64, count=len(self)))

    @property
    def self_trials(self) -> list[int]:
        """Indices of trials comparing an utterance with itself (a score of 1 whatever the model)."""
        enroll, test = self.sides
        return np.flatnonzero(enroll == test).tolist()

    @property
    def n_target(self) -> int:
        return int(np.count_nonzero(self.labels == 1))

    @property
    def n_nontarget(self) -> int:
        return int(np.count_nonzero(self.labels == 0))

    def select(self, mask) -> Trials:
        """The trials where ``mask`` (T,) bool is true."""
        mask = np.asarray(mask, dtype=bool)
        keep = np.flatnonzero(mask)
        return Trials(self.labels[mask], [self.enroll[i] for i in keep], [self.test[i] for i in keep])

    def missing(self, available) -> list[str]:
        """Utterance ids of the trials that are not in ``available`` (a set or mapping)."""
        return [u for u in self.utterances if u not in available]

    def indices(self, rows: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of each trial's enroll and test utterance, (T,) int64 each.

        Args:
            rows: utterance id -> row of an embedding matrix; must cover every trial.
        """
        missing = self.missing(rows)
        if missing:
            raise TrialsError(
                f"{len(missing)} trial utterance(s) have no embedding, e.g. {', '.join(missing[:3])}"
            )
        # One look-up per distinct utterance, then integer gathers (not one per trial side).
        row = np.fromiter(map(rows.__getitem__, self.utterances), dtype=np.int64, count=len(self.utterances))
        enroll, test = self.sides
        return row[enroll], row[test]


def _label_column(fields: Sequence[str]) -> int | None:
    """0 for the VoxCeleb layout, 2 for the Kaldi layout, None if neither column is a label."""
    if fields[0] in LABELS:
        return 0
    if fields[2] in LABELS:
        return 2
    return None


def read_trials(path) -> Trials:
    """Read a trial list in the VoxCeleb or the Kaldi layout (see the module docstring).

    Args:
        path: text file, one trial per line.
    Returns:
        :class:`Trials` in file order.
    Raises:
        TrialsError: unreadable file, malformed line (file and line number), empty list,
            a pair listed with both labels.
    """
    path = Path(path)
    try:
        from mrlcache.runtime import read_text

        text = read_text(path, "utf-8-sig")  # a FIFO is refused, not waited on
    except (OSError, UnicodeDecodeError) as err:
        raise TrialsError(f"{path}: cannot read trial list ({err})") from err
    trials = _read_vectorised(text)
    # Any problem (or an empty list): the line-by-line reader finds the first bad line and names it.
    return trials if trials is not None else _read_lines(path, text)


def _columns(text: str) -> tuple[list, np.ndarray] | None:
    """The three columns of a list whose every non-blank line has three fields, and the line
    number (from 1) of each trial; None if a line has another number of fields."""
    lines = text.splitlines()
    if text.isascii() and "\t" not in text and "\x1f" not in text:
        # The usual layout, checked without splitting line by line: a trial line holds two
        # spaces and no other blank, so at most three fields, and the whole text's fields
        # are three per such line only if each has three.
        spaces = np.fromiter(map(str.count, lines, itertools.repeat(" ")), dtype=np.int64, count=len(lines))
        trial = spaces == 2
        if np.all(trial | (np.fromiter(map(len, lines), dtype=np.int64, count=len(lines)) == 0)):
            fields = text.split()
            if len(fields) == 3 * np.count_nonzero(trial):
                return [fields[0::3], fields[1::3], fields[2::3]], np.flatnonzero(trial) + 1
    rows = [(i, r) for i, r in enumerate((line.split() for line in lines), start=1) if r]
    if any(len(r) != 3 for _, r in rows):
        return None
    numbers, rows = zip(*rows) if rows else ((), ())
    return [list(c) for c in zip(*rows)] or [[], [], []], np.asarray(numbers, dtype=np.int64)


def _read_vectorised(text: str) -> Trials | None:
    """Parse a well-formed list with whole-array operations (550,000 trials: about a second of
    CPU, against 20 s line by line); None if any line is malformed, a label unknown, or a
    pair listed with both labels."""
    collecting = gc.isenabled()
    gc.disable()  # millions of small strings and lists: the cyclic collector would scan them again and again
    try:
        found = _columns(text)
    finally:
        if collecting:
            gc.enable()
    if found is None or not found[0][0]:
        return None
    cols, line_of = found
    column = _label_column([c[0] for c in cols])
    if column is None:
        return None
    if not set(cols[column]) <= LABELS.keys():
        return None
    n = len(cols[0])
    labels = np.fromiter(map(LABELS.__getitem__, cols[column]), dtype=np.int8, count=n)
    enroll, test = (cols[1], cols[2]) if column == 0 else (cols[0], cols[1])
    # One integer per distinct utterance, in order of first appearance in enroll + test,
    # given in one pass (a missing key draws the next number); an unordered pair is
    # min(id) * U + max(id).
    ids = defaultdict(itertools.count().__next__)
    codes = np.fromiter(map(ids.__getitem__, enroll + test), dtype=np.int64, count=2 * n)
    e, t = codes[:n], codes[n:]
    key = np.minimum(e, t) * len(ids) + np.maximum(e, t)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    first_of = first[inverse]  # each trial's first listing of its pair
    again = np.flatnonzero(first_of != np.arange(n))
    if np.any(labels[again] != labels[first_of[again]]):
        return None
    trials = Trials(labels, enroll, test, [(int(line_of[i]), int(line_of[first_of[i]])) for i in again])
    # Trials.utterances and Trials.sides from the ids: order of first appearance, enroll
    # before test per trial.
    names = list(ids)
    seen, at = np.unique(np.stack([e, t], axis=1).ravel(), return_index=True)
    order = seen[np.argsort(at)]  # (U,) ids in order of first appearance
    trials.__dict__["utterances"] = [names[i] for i in order]
    position = np.empty(len(names), dtype=np.int64)
    position[order] = np.arange(len(order))
    trials.__dict__["sides"] = (position[e], position[t])
    return trials


def _read_lines(path: Path, text: str) -> Trials:
    """The reference reader, one line at a time: names the first bad line of a list the fast path refused."""
    labels, enroll, test = [], [], []
    column = None  # fixed by the first trial; every later line must follow it
    first: dict[frozenset, tuple[int, int]] = {}  # unordered pair -> (line, label)
    duplicates = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise TrialsError(
                f"{path}:{lineno}: expected 3 fields 'LABEL ENROLL TEST' or 'ENROLL TEST LABEL', "
                f"got {len(fields)}: {line.strip()!r}"
            )
        if column is None:
            column = _label_column(fields)
            if column is None:
                raise TrialsError(
                    f"{path}:{lineno}: no label (1/0/target/nontarget) in the first or last "
                    f"column: {line.strip()!r}"
                )
        label = fields[column]
        if label not in LABELS:
            layout = "first" if column == 0 else "last"
            raise TrialsError(
                f"{path}:{lineno}: label {label!r} in the {layout} column is not one of "
                f"1/0/target/nontarget: {line.strip()!r}"
            )
        pair = fields[1:] if column == 0 else fields[:2]
        key = frozenset(pair)
        if key in first:
            if first[key][1] != LABELS[label]:
                raise TrialsError(
                    f"{path}:{lineno}: the pair {pair[0]} {pair[1]} is listed on line {first[key][0]} "
                    "with the opposite label; keep the right one"
                )
            duplicates.append((lineno, first[key][0]))
        else:
            first[key] = (lineno, LABELS[label])
        labels.append(LABELS[label])
        enroll.append(pair[0])
        test.append(pair[1])
    if not labels:
        raise TrialsError(f"{path}: no trials in the file")
    return Trials(np.asarray(labels, dtype=np.int8), enroll, test, duplicates)
