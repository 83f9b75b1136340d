"""Rows of a dense array read as byte ranges of its uncompressed chunks (both backends).

A shard's dense arrays (layout.py) are stored uncompressed: a zarr v3 chunk file is the raw
little-endian bytes of its chunk (edge chunks whole), and an HDF5 chunk is the same bytes at
an offset the file's chunk index gives. A chunk of a dense array holds one view of a run
of rows, so row ``r`` of the chunk starting at byte ``base`` is the ``row_bytes`` bytes at
``base + r * row_bytes``. :func:`read_rows_at` reads just those bytes into the caller's
array, one ``pread`` per run of adjacent rows, after checking the file is long enough: a
short file is a one-line :class:`DamagedCacheError`, never zeros or a crash.

The backends say where a view's chunks are (``read_rows`` of zarr_backend.py and
hdf5_backend.py); the reader (:meth:`mrlcache.cache.reader.Shard.read`) uses them for every
read of some rows, so a streamed fit's pass reads only its own rows' bytes in the view each
drew, not whole chunks (benchmarks/README.md, issue 22).
"""

from __future__ import annotations

import os

import numpy as np

from mrlcache.cache.format import REPAIR, DamagedCacheError


def short(file, what: str) -> DamagedCacheError:
    """The error for a chunk a file does not hold in full: one line naming the file and the fix."""
    return DamagedCacheError(f"{file}: damaged shard ({what}); 'mrlcache check CACHE' lists every damaged "
                             f"shard; {REPAIR}")


def runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of adjacent values in increasing ``rows``: rows[a:b] are consecutive."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])


def by_chunk(rows: np.ndarray, per_chunk: int):
    """Yield (chunk, a, b) for increasing ``rows`` in chunks of ``per_chunk`` rows: rows[a:b] are in ``chunk``."""
    chunk_of = rows // per_chunk
    breaks = np.flatnonzero(np.diff(chunk_of)) + 1
    for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
        yield int(chunk_of[a]), int(a), int(b)


def read_rows_at(file, chunks: list[tuple[int, int, np.ndarray, slice]], out: np.ndarray) -> np.ndarray:
    """Rows of ``out`` read from ``file``: ``chunks`` [(base, size, rows, into)], rows
    (increasing, distinct, positions in the chunk of ``size`` bytes at byte ``base``) go to
    ``out[into]``, each ``out[0].nbytes`` bytes; ``out`` C-contiguous in the stored dtype.

    Raises:
        DamagedCacheError: the file ends before a chunk does.
    """
    row_bytes = out[0].nbytes if len(out) else 0
    flat = memoryview(out.reshape(-1).view(np.uint8)) if out.size else None
    fd = os.open(file, os.O_RDONLY)
    try:
        length = os.fstat(fd).st_size
        for base, size, rows, into in chunks:
            if base + size > length:
                raise short(file, f"{length} bytes, a chunk of {size} bytes at {base} ends past it")
            first = into.start
            for a, b in zip(*runs(rows)):
                at, want = (first + a) * row_bytes, (b - a) * row_bytes
                got, offset = 0, base + int(rows[a]) * row_bytes
                while got < want:  # a regular file reads in full short of its end
                    n = os.preadv(fd, [flat[at + got:at + want]], offset + got)
                    if n == 0:
                        raise short(file, f"ends at byte {offset + got} inside a chunk")
                    got += n
    finally:
        os.close(fd)
    return out
