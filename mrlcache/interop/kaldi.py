"""Kaldi ark and scp files read by our own rules, so nothing in them runs or reads stdin.

kaldiio hands an scp entry to a shell when it starts or ends with ``|`` (also after a
``:offset`` or ``[range]`` is added to it), reads stdin for ``-``, and unpickles a ``PKL``
record in an ark. Here the scp line is split with Kaldi's own rules (the key up to the
first whitespace, whitespace being space, tab, CR, form feed and vertical tab; the
rxfilename the rest, with an optional ``:offset`` and ``[range]``), the file part must be
an existing regular file, and it is opened by us; each record must be a Kaldi binary
(``\\0B``) or text (``[ ... ]``) matrix or vector, whose sizes are checked against the
bytes left in the file before anything is read. Only then does kaldiio decode it.

An scp's relative paths are resolved against the current directory, as Kaldi does.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrlcache.interop.errors import InteropError
from mrlcache.runtime import NotRegularFileError, open_regular

KALDI_SPACE = " \t\r\f\v"  # C isspace() without the newline, which ends a line
_OFFSET = re.compile(r"^(.*):([0-9]+)$", re.S)
_RANGE = re.compile(r"^(.*)\[([0-9:,\s]*)\]$", re.S)
_MATRIX_TYPES = {"FM": ("f", 4), "FV": ("f", 4), "DM": ("d", 8), "DV": ("d", 8)}
_COMPRESSED = {"CM": 1, "CM2": 2, "CM3": 1}  # bytes per value (CM adds 8 bytes per column)
MAX_KEY_BYTES = 4096


@dataclass(frozen=True)
class ScpEntry:
    """One scp line: ``key rxfilename`` with the rxfilename split into its parts."""

    line: int
    key: str
    path: str
    offset: int | None
    ranges: tuple | None  # per axis (first, last) inclusive, or None for the whole axis


def _where(scp, n: int) -> str:
    return f"{scp}:{n}"


def _ranges(text: str, where: str) -> tuple:
    """'0:9' or '0:9,3:5' (inclusive, Kaldi's row and column ranges) -> ((0, 9), (3, 5))."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part in ("", ":"):
            out.append(None)
            continue
        bounds = part.split(":")
        if len(bounds) != 2 or not all(b.strip().isdigit() for b in bounds):
            raise InteropError(f"{where}: range [{text}] is not 'first:last' (rows) or 'first:last,first:last'")
        first, last = (int(b) for b in bounds)
        if last < first:
            raise InteropError(f"{where}: range [{text}] ends before it starts")
        out.append((first, last))
    if len(out) > 2:
        raise InteropError(f"{where}: range [{text}] has more than two axes")
    return tuple(out)


def parse_scp(path) -> list[ScpEntry]:
    """Every entry of an scp, checked: no command, no stdin, a regular file, keys given once.

    Raises:
        InteropError: a line without a key and a file, a file part that is a command
            (``| cmd``, ``cmd |``), stdin (``-``), missing or not a regular file, a bad
            offset or range, a key given twice.
    """
    scp = Path(path)
    try:
        with open_regular(scp) as f:
            text = f.read().decode("utf-8")
    except NotRegularFileError as err:
        raise InteropError(str(err)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InteropError(f"{scp}: unreadable Kaldi scp ({err})") from None
    entries, seen = [], {}
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(KALDI_SPACE)
        if not line:
            continue
        where = _where(scp, n)
        cut = next((i for i, c in enumerate(line) if c in KALDI_SPACE), None)
        if cut is None:
            raise InteropError(f"{where}: expected 'key rxfilename', got {line!r}")
        key, rx = line[:cut], line[cut:].lstrip(KALDI_SPACE)
        odd = [c for c in key + rx if (ord(c) < 32 and c not in KALDI_SPACE) or (c.isspace() and c not in " \t")]
        if odd:
            raise InteropError(f"{where}: control or unusual whitespace characters {odd[:3]!r} in {line!r}; "
                               f"write 'key path[:offset]' separated by a space")
        ranges = None
        if (m := _RANGE.match(rx)) is not None:
            rx, ranges = m.group(1), _ranges(m.group(2), where)
        offset = None
        if (m := _OFFSET.match(rx)) is not None:
            rx, offset = m.group(1), int(m.group(2))
        if rx.strip(KALDI_SPACE) in ("", "-") or rx.strip(KALDI_SPACE).startswith("|") or rx.strip(KALDI_SPACE).endswith("|"):
            raise InteropError(
                f"{where}: {rx!r} is not a file but a command or stdin, which would run; "
                f"run it once, write its vectors to an ark and list that"
            )
        if not os.path.isfile(rx):
            what = "does not exist" if not os.path.lexists(rx) else "is not a regular file"
            raise InteropError(f"{where}: {rx!r} {what}; list the ark files the vectors are in")
        if key in seen:
            raise InteropError(f"{where}: key {key!r} given twice (first on line {seen[key]}); each utterance once")
        seen[key] = n
        entries.append(ScpEntry(n, key, rx, offset, ranges))
    return entries


def _check_size(need: int, f, where: str) -> None:
    left = os.fstat(f.fileno()).st_size - f.tell()
    if need < 0 or need > left:
        raise InteropError(f"{where}: the record claims {need} bytes of data but {left} are left in the file; "
                           f"the ark is truncated or not a Kaldi ark")


def read_record(f, where: str):
    """One Kaldi matrix or vector at the file's position; refuses other record kinds.

    Binary float/double (FM, FV, DM, DV) and compressed (CM, CM2, CM3) matrices and text
    ``[ ... ]`` ones are read; sizes are checked against the file before any read.
    """
    import kaldiio.matio

    start = f.tell()
    head = f.read(5)
    if head[:2] == b"\0B":
        f.seek(start + 2)
        kind = f.read(4).split(b" ", 1)[0].decode("ascii", "replace")
        f.seek(start + 3 + len(kind))
        if kind in _MATRIX_TYPES:
            code, size = _MATRIX_TYPES[kind]
            dims = []
            for _ in range(2 if kind.endswith("M") else 1):
                header = f.read(5)
                if len(header) != 5 or header[0] != 4:
                    raise InteropError(f"{where}: a {kind} record with a broken size header")
                dims.append(struct.unpack("<i", header[1:])[0])
            count = int(np.prod(dims)) if all(d >= 0 for d in dims) else -1
            _check_size(count * size, f, where)
            array = np.frombuffer(f.read(count * size), dtype="<" + code)
            return array.reshape(dims) if kind.endswith("M") else array
        if kind in _COMPRESSED:
            header = f.read(16)
            if len(header) != 16:
                raise InteropError(f"{where}: a {kind} record with a broken header")
            rows, cols = struct.unpack("<ii", header[8:])
            count = rows * cols * _COMPRESSED[kind] + (8 * cols if kind == "CM" else 0)
            _check_size(count if rows >= 0 and cols >= 0 else -1, f, where)
            f.seek(start)
            return kaldiio.matio.read_matrix_or_vector(f)
        raise InteropError(f"{where}: a binary {kind!r} record; only float matrices and vectors are vectors")
    if head.lstrip(b" \n")[:1] == b"[":
        f.seek(start)
        return kaldiio.matio.read_ascii_mat(f)
    known = {b"PKL": "a Python pickle, which could run code", b"NPY": "a numpy record", b"RIFF": "audio",
             b"fLaC": "audio", b"AUDIO": "audio"}
    what = next((v for k, v in known.items() if head.startswith(k)), f"bytes {head!r}")
    raise InteropError(f"{where}: the record is {what}, not a Kaldi matrix or vector; write it with "
                       f"Kaldi or kaldiio.save_ark")


def _slice(array, ranges, where: str):
    if ranges is None:
        return array
    index = []
    for axis, r in enumerate(ranges):
        if r is not None and (axis >= array.ndim or r[1] >= array.shape[axis]):
            raise InteropError(f"{where}: range {ranges} outside the record of shape {array.shape}")
        index.append(slice(None) if r is None else slice(r[0], r[1] + 1))
    return array[tuple(index)]


def read_scp(path) -> list[tuple[str, np.ndarray]]:
    """(key, array) of every entry of an scp, read from regular files we open ourselves."""
    items, handles = [], {}
    try:
        for e in parse_scp(path):
            where = f"{_where(path, e.line)} ({e.path})"
            f = handles.get(e.path)
            if f is None:
                try:
                    f = handles[e.path] = open_regular(e.path)
                except NotRegularFileError as err:
                    raise InteropError(str(err)) from None
            f.seek(e.offset or 0)
            items.append((e.key, _slice(read_record(f, where), e.ranges, where)))
    finally:
        for f in handles.values():
            f.close()
    return items


def read_ark(path) -> list[tuple[str, np.ndarray]]:
    """(key, array) of every record of an ark, in file order."""
    items = []
    try:
        f = open_regular(path)
    except NotRegularFileError as err:
        raise InteropError(str(err)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            key = bytearray()
            while (c := f.read(1)) not in (b" ", b""):
                key += c
                if len(key) > MAX_KEY_BYTES:
                    raise InteropError(f"{path}: no record key within {MAX_KEY_BYTES} bytes at byte {f.tell()}; not a Kaldi ark")
            text = key.decode("utf-8", "replace").strip()
            if not text:
                if c == b"":
                    break
                continue
            items.append((text, read_record(f, f"{path}: record {text!r}")))
    return items
