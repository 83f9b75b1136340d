"""Rows of a dense array read as byte ranges of its uncompressed chunks (both backends).

A shard's dense arrays (layout.py) are stored uncompressed: a zarr v3 chunk file is the raw
little-endian bytes of its chunk (edge chunks whole), and an HDF5 chunk is the same bytes at
an offset the file's chunk index gives. A chunk of a dense array holds one view of a run
of rows, so row ``r`` of the chunk starting at byte ``base`` is the ``row_bytes`` bytes at
``base + r * row_bytes``. :func:`read_rows_at` reads those bytes into the caller's array,
one ``preadv`` per run of adjacent rows (runs less than :data:`GAP_BYTES` apart share one,
the gap read into a scratch buffer), after checking the file is long enough: a short
file is a one-line :class:`DamagedCacheError`, never zeros or a crash.

The backends say where a view's chunks are (``read_rows`` of zarr_backend.py and
hdf5_backend.py); the reader (:meth:`mrlcache.cache.reader.Shard.read`) uses them for every
read of some rows, so a streamed fit's pass reads only its own rows' bytes in the view each
drew, not whole chunks (benchmarks/README.md, issue 22).
"""

from __future__ import annotations

import os

import numpy as np

from mrlcache.cache.format import REPAIR, DamagedCacheError

# Runs of rows closer than this are read in one request (the bytes between them are read
# and dropped): a request costs about as much as tens of KB more read, from the page cache
# (a system call) and from a disk (its latency). Measured on the rows of one pass of 1
# (a sixth of each view's rows): 74 ms per shard cold and 15 warm, against 125 and 20 with
# one request per run (benchmarks/README.md, issue 22).
GAP_BYTES = 64 << 10
IOV_MAX = 1024  # buffers one preadv takes (Linux)


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

    One ``preadv`` per request: a run of adjacent rows, or several runs less than
    :data:`GAP_BYTES` apart (the bytes between them land in a scratch buffer).

    Raises:
        DamagedCacheError: the file ends before a chunk does.
    """
    row_bytes = out[0].nbytes if len(out) else 0
    flat = memoryview(out.reshape(-1).view(np.uint8)) if out.size else None
    scratch = memoryview(bytearray(GAP_BYTES)) if GAP_BYTES else None
    fd = os.open(file, os.O_RDONLY)
    try:
        length = os.fstat(fd).st_size
        for base, size, rows, into in chunks:
            if base + size > length:
                raise short(file, f"{length} bytes, a chunk of {size} bytes at {base} ends past it")
            starts, ends = runs(rows)
            gaps = (rows[starts[1:]] - rows[ends[:-1] - 1] - 1) * row_bytes  # bytes between runs
            # a request starts at every run farther than GAP_BYTES from the previous one, and
            # every IOV_MAX // 2 runs (each run a buffer, each gap one more)
            new = np.r_[True, gaps > GAP_BYTES] | (np.arange(len(starts)) % (IOV_MAX // 2) == 0)
            firsts = np.flatnonzero(new)
            for i, j in zip(firsts, np.r_[firsts[1:], len(starts)]):
                bufs = []
                for r in range(i, j):
                    if r > i:
                        bufs.append(scratch[:gaps[r - 1]])
                    bufs.append(flat[(into.start + starts[r]) * row_bytes:(into.start + ends[r]) * row_bytes])
                offset, want = base + int(rows[starts[i]]) * row_bytes, sum(len(b) for b in bufs)
                if os.preadv(fd, bufs, offset) != want:  # a regular file reads in full short of its end
                    raise short(file, f"ends inside the {want} bytes at {offset}")
    finally:
        os.close(fd)
    return out
