"""The storage interface of one shard, and the one registry of the formats that implement it.

A shard is a set of named arrays plus a small JSON-able dict of attributes. A backend is a
small class (one file each: ``zarr_backend.py``, ``hdf5_backend.py``) with array verbs:
write a shard's arrays, read (rows of) an array, read some rows of one view, check an array's structure, read the
metadata. It registers itself with :func:`register_backend`; ``BACKENDS`` maps the name
given to ``--format`` (and stored in cache.json's ``format``) to the class. Which arrays a
stream is stored as, and everything else (checks of rows, checksums, resume), is
format-neutral (layout.py, integrity.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ShardBackend(Protocol):
    """What the writer and the reader need from a shard file format."""

    name: str  # e.g. "zarr": the value of --format and of cache.json's "format"
    suffix: str  # e.g. ".zarr": shard file names are shard-00000<suffix>

    def write(self, path, attrs: dict, arrays: dict) -> None:
        """Write a complete shard at ``path`` (must not exist): ``attrs`` JSON-able (with
        ``skipped``, {utt_id: reason}, which may be large), ``arrays`` {name: (array,
        chunks)}, uncompressed; chunks None is one block (HDF5: contiguous)."""

    def read_meta(self, path) -> tuple[dict, dict]:
        """Return (attrs, {array name: shape}) of the shard at ``path``; reads no array values."""

    def read_array(self, path, name: str, selection=(), out: np.ndarray | None = None) -> np.ndarray:
        """``array[selection]`` (ints, slices, at most one increasing int array), reading only
        the chunks the selection touches; into ``out`` when given (any float dtype), returned."""

    def read_rows(self, path, name: str, view: int, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (increasing, distinct) of view ``view`` of a dense array, into ``out``
        ((len(rows), *item), the stored dtype), returned: only those rows' bytes are read
        (byte ranges of the uncompressed chunks, byteranges.py)."""

    def check_array(self, path, name: str, shape: tuple, dtype, chunks: tuple | None) -> list[str]:
        """Structural problems of the array ``name`` (missing, shape, dtype, chunks missing or
        short); reads no values. Empty when sound."""

    def array_bytes(self, path, name: str) -> int:
        """Bytes on disk of the array ``name``."""


# Name -> backend class, in registration order (zarr first: the default).
BACKENDS: dict[str, ShardBackend] = {}


def register_backend(backend):
    """Add a backend class to ``BACKENDS`` under ``backend.name``; usable as a class decorator.

    Raises:
        ValueError: the name or the file suffix is already taken by another backend.
    """
    for other in BACKENDS.values():
        if other is backend:
            return backend
        if other.name == backend.name or other.suffix == backend.suffix:
            raise ValueError(
                f"cache backend {backend.name!r} ({backend.suffix}) clashes with the registered "
                f"{other.name!r} ({other.suffix}); choose another name and suffix"
            )
    BACKENDS[backend.name] = backend
    return backend
