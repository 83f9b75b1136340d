"""The storage interface of one shard, and the one registry of the formats that implement it.

A backend is a small class (one file each: ``zarr_backend.py``, ``hdf5_backend.py``) that
writes one complete shard, reads its metadata and vectors back, and lists what is
structurally wrong with a shard file. It registers itself with :func:`register_backend`;
``BACKENDS`` maps the name given to ``--format`` (and stored in cache.json's ``format``) to
the class. Everything else (layout, checks of rows, checksums, resume) is format-neutral.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ShardBackend(Protocol):
    """What the writer and the reader need from a shard file format."""

    name: str  # e.g. "zarr": the value of --format and of cache.json's "format"
    suffix: str  # e.g. ".zarr": shard file names are shard-00000<suffix>

    def write(self, path, pooled: np.ndarray | None, index: np.ndarray, attrs: dict, arrays: dict | None = None) -> None:
        """Write a complete shard at ``path`` (must not exist).

        pooled: (n, V, D) in the stored dtype, or None (no pooled stream); index: (n,)
        int64; attrs: JSON-able dict, including ``skipped`` ({utt_id: reason}); arrays:
        the other streams' arrays {name: (array, chunks)} (layout.py), uncompressed.
        """

    def read_meta(self, path) -> tuple[dict, np.ndarray, tuple | None]:
        """Return (attrs, index (n,) int64, pooled shape (n, V, D) or None) of the shard at ``path``."""

    def read_array(self, path, name: str, selection=()) -> np.ndarray:
        """``array[selection]`` (ints, slices, at most one increasing int array), reading only
        the chunks the selection touches."""

    def array_bytes(self, path, name: str) -> int:
        """Bytes on disk of the array ``name``."""

    def check_array(self, path, name: str, shape: tuple, dtype, chunks: tuple) -> list[str]:
        """Structural problems of the array ``name`` (missing, shape, dtype, chunks); reads no values."""

    def read_pooled(self, path, out: np.ndarray, view: int | None = None) -> None:
        """Fill ``out`` ((n, V, D), or (n, D) for one view) with the shard's vectors."""

    def check(self, path, shape: tuple, dtype: np.dtype) -> list[str]:
        """Structural problems of the shard at ``path`` (missing or short chunks, wrong
        dtype or chunking) for pooled shape ``shape``; empty when sound. Reads no vectors."""


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
