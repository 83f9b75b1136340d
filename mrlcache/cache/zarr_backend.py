"""Zarr v3 shard files: one group per shard, one uncompressed chunk per view.

Layout of ``shard-00000.zarr`` (a zarr v3 group, see docs/cache-format.md):

- ``pooled``: (n_ok, V, D) float16|float32, chunks (n_ok, 1, D), no compressor, so the
  chunk file ``pooled/c/0/<v>/0`` is exactly the raw little-endian bytes of view v;
- ``index``: (n_ok,) int64, the manifest row of each vector;
- group attributes: the shard's numbers and its skipped utterances ``{utt_id: reason}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.buffer.cpu import NDBuffer
from zarr.storage import LocalStore

from mrlcache.cache.backends import register_backend


@register_backend
class ZarrBackend:
    """Writes and reads one shard as a zarr v3 group (a directory)."""

    name = "zarr"
    suffix = ".zarr"

    @staticmethod
    def write(path, pooled: np.ndarray, index: np.ndarray, attrs: dict) -> None:
        """Write a complete shard at ``path`` (must not exist).

        pooled: (n, V, D) already in the stored dtype; index: (n,) int64; attrs: JSON-able.
        """
        n, views, dim = pooled.shape
        group = zarr.open_group(LocalStore(str(path)), mode="w-", attributes=attrs)
        # One chunk per view of all rows: reading view v reads exactly one file. The
        # vectors barely compress (~92% of raw), so compression would cost throughput
        # for almost no space. write_empty_chunks keeps an all-zero view on disk too,
        # so every shard has the same files.
        array = group.create_array(
            "pooled",
            shape=(n, views, dim),
            chunks=(max(n, 1), 1, dim),
            dtype=pooled.dtype,
            compressors=None,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        if n:
            array[:] = pooled
        group.create_array(
            "index",
            shape=(n,),
            chunks=(max(n, 1),),
            dtype=np.int64,
            compressors=None,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        if n:
            group["index"][:] = index

    @staticmethod
    def read_meta(path) -> tuple[dict, np.ndarray, tuple]:
        """Return (attrs, index (n,) int64, pooled shape (n, V, D)) of the shard at ``path``."""
        group = zarr.open_group(LocalStore(str(path), read_only=True), mode="r")
        index = np.asarray(group["index"][:], dtype=np.int64)
        return dict(group.attrs), index, tuple(group["pooled"].shape)

    @staticmethod
    def read_pooled(path, out: np.ndarray, view: int | None = None) -> None:
        """Fill ``out`` ((n, V, D), or (n, D) for one view) with the shard's vectors.

        A one-view read selects ``[:, view]``, which maps to the single chunk of that view.
        In the stored dtype zarr decodes straight into ``out``; otherwise numpy converts.
        """
        group = zarr.open_group(LocalStore(str(path), read_only=True), mode="r")
        array = group["pooled"]
        if array.shape[0] == 0:
            return
        selection = np.s_[:, :, :] if view is None else np.s_[:, view, :]
        if out.dtype == array.dtype:
            array.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out))
        else:
            np.copyto(out, array.get_basic_selection(selection), casting="same_kind")

    @staticmethod
    def check(path, shape: tuple, dtype) -> list[str]:
        """Structural problems: wrong dtype/chunking, chunk files missing or of the wrong size.

        Needed because a missing chunk reads back as the fill value (zeros) without error.
        Chunks are uncompressed, so each chunk file holds exactly its array bytes.
        """
        n, views, dim = shape
        group = zarr.open_group(LocalStore(str(path), read_only=True), mode="r")
        pooled, index = group["pooled"], group["index"]
        problems = []
        if pooled.dtype != np.dtype(dtype):
            problems.append(f"pooled is {pooled.dtype}, cache.json says {np.dtype(dtype)}")
        if index.dtype != np.int64 or index.shape != (n,):
            problems.append(f"index is {index.dtype} {index.shape}, expected int64 ({n},)")
        if n == 0 or problems:
            return problems
        if tuple(pooled.chunks) != (n, 1, dim) or tuple(index.chunks) != (n,):
            problems.append(f"pooled chunks {pooled.chunks}, expected {(n, 1, dim)} (not written by mrlcache)")
            return problems
        root = Path(path)
        size = n * dim * pooled.dtype.itemsize
        chunks = [(root / "pooled" / "c" / "0" / str(v) / "0", size, f"pooled chunk of view {v}") for v in range(views)]
        for file, size, what in chunks + [(root / "index" / "c" / "0", n * 8, "index chunk")]:
            if not file.is_file():
                problems.append(f"{what} ({file.relative_to(root)}) is missing")
            elif file.stat().st_size != size:
                problems.append(f"{what} ({file.relative_to(root)}) has {file.stat().st_size} bytes, expected {size}")
        return problems
