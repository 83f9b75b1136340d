"""HDF5 shard files: one ``.h5`` file per shard, one uncompressed chunk per view.

Layout of ``shard-00000.h5`` (see docs/cache-format.md):

- ``pooled``: (n_ok, V, D) float16|float32, chunks (n_ok, 1, D), no filter;
- ``index``: (n_ok,) int64, the manifest row of each vector;
- ``skipped_json``: a scalar UTF-8 string, JSON ``{utt_id: reason}`` (a dataset rather than
  an attribute because HDF5 attributes are limited to 64 KiB);
- root attributes: the shard's numbers (everything in attrs except ``skipped``).
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np

from mrlcache.cache.backends import register_backend


@register_backend
class HDF5Backend:
    """Writes and reads one shard as an HDF5 file."""

    name = "hdf5"
    suffix = ".h5"

    @staticmethod
    def write(path, pooled: np.ndarray | None, index: np.ndarray, attrs: dict, arrays: dict | None = None) -> None:
        """Write a complete shard at ``path`` (must not exist).

        pooled: (n, V, D) already in the stored dtype, or None (a cache without pooled);
        index: (n,) int64; attrs: JSON-able; arrays: the other streams' arrays
        {name: (array, chunks)} (see layout.py).
        """
        attrs = dict(attrs)
        skipped = attrs.pop("skipped", {})
        with h5py.File(path, "w-") as f:
            if pooled is not None:
                # Same chunking as zarr: one chunk per view, so a one-view read touches one chunk.
                # (An empty shard cannot be chunked: HDF5 wants chunks no larger than the data.)
                n, views, dim = pooled.shape
                f.create_dataset("pooled", data=pooled, chunks=(n, 1, dim) if n else None)
            f.create_dataset("index", data=np.asarray(index, dtype=np.int64))
            f.create_dataset("skipped_json", data=json.dumps(skipped, sort_keys=True))
            for name, (data, chunks) in (arrays or {}).items():
                f.create_dataset(name, data=data, chunks=chunks if data.size else None)
            for key, value in attrs.items():
                f.attrs[key] = json.dumps(value)
            f.flush()

    @staticmethod
    def read_meta(path) -> tuple[dict, np.ndarray, tuple | None]:
        """Return (attrs, index (n,) int64, pooled shape (n, V, D) or None) of the shard at ``path``."""
        with h5py.File(path, "r") as f:
            attrs = {key: json.loads(value) for key, value in f.attrs.items()}
            attrs["skipped"] = json.loads(f["skipped_json"][()])
            shape = tuple(f["pooled"].shape) if "pooled" in f else None
            return attrs, f["index"][:].astype(np.int64, copy=False), shape

    @staticmethod
    def read_array(path, name: str, selection=()) -> np.ndarray:
        """``array[selection]`` of the shard's dataset ``name``: ints, slices and at most one
        increasing int array (rows); HDF5 reads only the chunks the selection touches."""
        with h5py.File(path, "r") as f:
            dset = f[name]
            selection = tuple(selection) + (slice(None),) * (dset.ndim - len(selection))
            if any(isinstance(s, np.ndarray) and len(s) == 0 for s in selection):
                shape = [len(range(*s.indices(n))) if isinstance(s, slice) else len(s)
                         for s, n in zip(selection, dset.shape) if not isinstance(s, (int, np.integer))]
                return np.empty(shape, dtype=dset.dtype)
            return dset[selection]

    @staticmethod
    def array_bytes(path, name: str) -> int:
        """Bytes on disk of the shard's dataset ``name``."""
        with h5py.File(path, "r") as f:
            return int(f[name].id.get_storage_size())

    @staticmethod
    def check_array(path, name: str, shape: tuple, dtype, chunks: tuple) -> list[str]:
        """Problems of the dataset ``name``: missing, wrong shape/dtype/chunks, chunks short or past the end."""
        file_size = os.path.getsize(path)
        with h5py.File(path, "r") as f:
            if name not in f:
                return [f"dataset {name} is missing"]
            dset = f[name]
            if dset.shape != tuple(shape) or dset.dtype != np.dtype(dtype):
                return [f"{name} is {dset.dtype} {dset.shape}, expected {np.dtype(dtype)} {tuple(shape)}"]
            if 0 in shape:
                return []
            if dset.chunks != tuple(chunks) or dset.compression is not None:
                return [f"{name} chunks {dset.chunks}, expected {tuple(chunks)} (not written by mrlcache)"]
            expected = int(np.prod([-(-s // c) for s, c in zip(shape, chunks)]))
            size = int(np.prod(chunks)) * dset.dtype.itemsize
            if dset.id.get_num_chunks() != expected:
                return [f"{name} has {dset.id.get_num_chunks()} chunks, expected {expected}"]
            for i in range(expected):
                info = dset.id.get_chunk_info(i)
                if info.size != size or info.byte_offset + info.size > file_size:
                    return [f"{name} chunk {info.chunk_offset} is short or past the end of the file"]
        return []

    @staticmethod
    def read_pooled(path, out: np.ndarray, view: int | None = None) -> None:
        """Fill ``out`` ((n, V, D), or (n, D) for one view) with the shard's vectors.

        In the stored dtype HDF5 reads straight into ``out``. Otherwise the shard is read
        as stored and converted by numpy: HDF5's own float16 -> float32 conversion of a
        one-view selection ran ~50x slower here (it converts through a small buffer).
        """
        with h5py.File(path, "r") as f:
            dset = f["pooled"]
            if dset.shape[0] == 0:
                return
            selection = np.s_[:, :, :] if view is None else np.s_[:, view, :]
            if out.dtype == dset.dtype:
                dset.read_direct(out, selection)
            else:
                np.copyto(out, dset[selection], casting="same_kind")

    @staticmethod
    def check(path, shape: tuple, dtype) -> list[str]:
        """Structural problems: datasets missing, wrong dtype/chunking, chunks missing,
        short or pointing past the end of the file (a truncated file)."""
        n, views, dim = shape
        file_size = os.path.getsize(path)
        problems = []
        with h5py.File(path, "r") as f:
            missing = [name for name in ("pooled", "index", "skipped_json") if name not in f]
            if missing:
                return [f"dataset {', '.join(missing)} missing"]
            pooled, index = f["pooled"], f["index"]
            if pooled.dtype != np.dtype(dtype):
                problems.append(f"pooled is {pooled.dtype}, cache.json says {np.dtype(dtype)}")
            if index.dtype != np.int64 or index.shape != (n,):
                problems.append(f"index is {index.dtype} {index.shape}, expected int64 ({n},)")
            if n == 0 or problems:
                return problems
            if pooled.chunks != (n, 1, dim) or pooled.compression is not None:
                return [f"pooled chunks {pooled.chunks}, expected {(n, 1, dim)} (not written by mrlcache)"]
            size = n * dim * pooled.dtype.itemsize
            if pooled.id.get_num_chunks() != views:
                problems.append(f"pooled has {pooled.id.get_num_chunks()} chunks, expected {views} (one per view)")
            for i in range(pooled.id.get_num_chunks()):
                info = pooled.id.get_chunk_info(i)
                if info.size != size or info.byte_offset + info.size > file_size:
                    problems.append(f"pooled chunk {info.chunk_offset} is short or past the end of the file")
            offset, stored = index.id.get_offset(), index.id.get_storage_size()
            if offset is None or stored != n * 8 or offset + stored > file_size:
                problems.append("index data is missing, short or past the end of the file")
        return problems
