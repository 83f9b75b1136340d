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
    def write(path, pooled: np.ndarray | None, index: np.ndarray, attrs: dict, arrays: dict | None = None) -> None:
        """Write a complete shard at ``path`` (must not exist).

        pooled: (n, V, D) already in the stored dtype, or None (a cache without pooled);
        index: (n,) int64; attrs: JSON-able; arrays: the other streams' arrays
        {name: (array, chunks)} (see layout.py).
        """
        n = len(index)
        group = zarr.open_group(LocalStore(str(path)), mode="w-", attributes=attrs)
        if pooled is not None:
            ZarrBackend._write_pooled(group, pooled)
        index_array = group.create_array(
            "index",
            shape=(n,),
            chunks=(max(n, 1),),
            dtype=np.int64,
            compressors=None,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        if n:
            # Through the array create_array returned: write_empty_chunks is a runtime
            # setting, so group["index"] (reopened) would skip an all-zero chunk, and the
            # index [0] of a one-row shard 0 would be missing on disk.
            index_array[:] = index
        for name, (data, chunks) in (arrays or {}).items():
            array = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=None,
                                       fill_value=0, config={"write_empty_chunks": True})
            if data.size:
                array[...] = data

    @staticmethod
    def _write_pooled(group, pooled: np.ndarray) -> None:
        n, views, dim = pooled.shape
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

    @staticmethod
    def read_meta(path) -> tuple[dict, np.ndarray, tuple | None]:
        """Return (attrs, index (n,) int64, pooled shape (n, V, D) or None) of the shard at ``path``."""
        group = zarr.open_group(LocalStore(str(path), read_only=True), mode="r")
        index = np.asarray(group["index"][:], dtype=np.int64)
        shape = tuple(group["pooled"].shape) if "pooled" in group else None
        return dict(group.attrs), index, shape

    @staticmethod
    def read_array(path, name: str, selection=()) -> np.ndarray:
        """``array[selection]`` of the shard's array ``name``: ints, slices and at most one
        increasing int array (rows); only the chunks the selection touches are read."""
        group = zarr.open_group(LocalStore(str(path), read_only=True), mode="r")
        array = group[name]
        selection = tuple(selection) + (slice(None),) * (array.ndim - len(selection))
        if any(isinstance(s, np.ndarray) for s in selection):
            return np.asarray(array.get_orthogonal_selection(selection))
        return np.asarray(array.get_basic_selection(selection))

    @staticmethod
    def array_bytes(path, name: str) -> int:
        """Bytes on disk of the shard's array ``name`` (its chunk files)."""
        root = Path(path) / name
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")

    @staticmethod
    def check_array(path, name: str, shape: tuple, dtype, chunks: tuple) -> list[str]:
        """Problems of the array ``name``: missing, wrong shape/dtype/chunks, chunk files missing or short."""
        group = zarr.open_group(LocalStore(str(path), read_only=True), mode="r")
        if name not in group:
            return [f"array {name} is missing"]
        array = group[name]
        if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
            return [f"{name} is {array.dtype} {tuple(array.shape)}, expected {np.dtype(dtype)} {tuple(shape)}"]
        if tuple(array.chunks) != tuple(chunks):
            return [f"{name} chunks {array.chunks}, expected {tuple(chunks)} (not written by mrlcache)"]
        if 0 in shape:
            return []
        size = int(np.prod(chunks)) * array.dtype.itemsize  # edge chunks are stored whole
        grid = [range(-(-s // c)) for s, c in zip(shape, chunks)]
        root = Path(path) / name / "c"
        for key in np.ndindex(*(len(g) for g in grid)):
            file = root.joinpath(*map(str, key))
            if not file.is_file() or file.stat().st_size != size:
                return [f"{name} chunk {'/'.join(map(str, key))} is missing or short"]
        return []

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
        if "pooled" not in group:
            return ["array pooled is missing"]
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
