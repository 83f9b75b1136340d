"""HDF5 shard files: one ``.h5`` file per shard, one dataset per stored array, no filter.

Layout of ``shard-00000.h5`` (see docs/cache-format.md): the arrays of layout.py as
datasets (``pooled`` (n_ok, V, D) in chunks (n_ok, 1, D); ``index`` contiguous; the other
streams), ``skipped_json`` a scalar UTF-8 string, JSON ``{utt_id: reason}`` (a dataset
rather than an attribute because HDF5 attributes are limited to 64 KiB), and the root
attributes (the shard's numbers, JSON each). Rows of one view are read as byte ranges of
the chunks, at the offsets HDF5's chunk index gives (:meth:`HDF5Backend.read_rows`,
byteranges.py).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from mrlcache.cache.backends import register_backend
from mrlcache.cache.byteranges import by_chunk, read_rows_at, short

SKIPPED = "skipped_json"


def _file(path, mode: str):
    """``h5py.File(path, mode)``; h5py is imported here, so reading a zarr cache never loads it."""
    import h5py

    return h5py.File(path, mode)


@register_backend
class HDF5Backend:
    """Writes and reads one shard as an HDF5 file."""

    name = "hdf5"
    suffix = ".h5"

    @staticmethod
    def write(path, attrs: dict, arrays: dict) -> None:
        """Write a complete shard at ``path`` (must not exist); chunks None: contiguous.

        (An empty array cannot be chunked: HDF5 wants chunks no larger than the data.)
        """
        attrs = dict(attrs)
        skipped = attrs.pop("skipped", {})
        with _file(path, "w-") as f:
            for name, (data, chunks) in arrays.items():
                f.create_dataset(name, data=data, chunks=chunks if chunks is not None and data.size else None)
            f.create_dataset(SKIPPED, data=json.dumps(skipped, sort_keys=True))
            for key, value in attrs.items():
                f.attrs[key] = json.dumps(value)
            f.flush()

    @staticmethod
    def read_meta(path) -> tuple[dict, dict]:
        """Return (attrs, {array name: shape}) of the shard at ``path``."""
        with _file(path, "r") as f:
            attrs = {key: json.loads(value) for key, value in f.attrs.items()}
            attrs["skipped"] = json.loads(f[SKIPPED][()])
            return attrs, {name: tuple(d.shape) for name, d in f.items() if name != SKIPPED}

    @staticmethod
    def read_array(path, name: str, selection=(), out: np.ndarray | None = None) -> np.ndarray:
        """``array[selection]`` of the shard's dataset ``name``: ints, slices and at most one
        increasing int array (rows); HDF5 reads only the chunks the selection touches.

        Into ``out`` in the stored dtype HDF5 reads directly. Otherwise the selection is read
        as stored and converted by numpy: HDF5's own float16 -> float32 conversion of a
        one-view selection ran ~50x slower here (it converts through a small buffer).
        """
        with _file(path, "r") as f:
            dset = f[name]
            selection = tuple(selection) + (slice(None),) * (dset.ndim - len(selection))
            if any(isinstance(s, np.ndarray) and len(s) == 0 for s in selection):
                shape = [len(range(*s.indices(n))) if isinstance(s, slice) else len(s)
                         for s, n in zip(selection, dset.shape) if not isinstance(s, (int, np.integer))]
                data = np.empty(shape, dtype=dset.dtype)
            elif out is not None and out.dtype == dset.dtype and not any(isinstance(s, np.ndarray) for s in selection):
                if out.size:
                    dset.read_direct(out, selection)
                return out
            else:
                data = dset[selection]
        if out is None:
            return data
        np.copyto(out, data, casting="same_kind")
        return out

    @staticmethod
    def read_rows(path, name: str, view: int, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (increasing, distinct) of view ``view`` of the dense dataset ``name``
        into ``out`` ((len(rows), *item), the stored dtype): the rows' bytes of the chunks,
        at the byte offsets of HDF5's chunk index (one chunk: some rows x 1 view, no filter)."""
        if not len(rows):
            return out
        try:
            f = _file(path, "r")
        except OSError as err:  # a truncated file fails here ("truncated file: eof = ...")
            raise short(path, f"HDF5 cannot open it: {err}") from None
        with f:
            dset = f[name]
            shape, chunks = dset.shape, dset.chunks
            if chunks is None or dset.compression is not None or dset.id.get_create_plist().get_nfilters() \
                    or chunks[1] != 1 or chunks[2:] != shape[2:] or dset.dtype.str[0] not in "<|":
                raise ValueError(f"{path}: dataset {name} is not uncompressed little-endian chunks of one view "
                                 "(not written by mrlcache)")
            if out.dtype.str != dset.dtype.str or out.shape != (len(rows), *shape[2:]):
                raise ValueError(f"{path}: rows of dataset {name} ({dset.dtype} {shape[2:]}) cannot be read into "
                                 f"{out.dtype} {out.shape}")
            per_chunk = chunks[0]
            size = per_chunk * math.prod(shape[2:]) * dset.dtype.itemsize
            wanted = []
            for c, a, b in by_chunk(rows, per_chunk):
                info = dset.id.get_chunk_info_by_coord((c * per_chunk, int(view)) + (0,) * (len(shape) - 2))
                if info.byte_offset is None or info.size != size:
                    raise short(path, f"{name} chunk {info.chunk_offset} holds {info.size} bytes, expected {size}")
                wanted.append((info.byte_offset, size, rows[a:b] - c * per_chunk, slice(a, b)))
        return read_rows_at(path, wanted, out)

    @staticmethod
    def array_bytes(path, name: str) -> int:
        """Bytes on disk of the shard's dataset ``name``."""
        with _file(path, "r") as f:
            return int(f[name].id.get_storage_size())

    @staticmethod
    def check_array(path, name: str, shape: tuple, dtype, chunks: tuple | None) -> list[str]:
        """Problems of the dataset ``name``: missing, wrong shape/dtype/chunks, chunks (or the
        contiguous data) short or past the end of the file (a truncated file)."""
        file_size = os.path.getsize(path)
        with _file(path, "r") as f:
            if name not in f:
                return [f"dataset {name} is missing"]
            dset = f[name]
            if dset.shape != tuple(shape) or dset.dtype != np.dtype(dtype):
                return [f"{name} is {dset.dtype} {dset.shape}, expected {np.dtype(dtype)} {tuple(shape)}"]
            if 0 in shape:
                return []
            if chunks is None:
                offset, stored = dset.id.get_offset(), dset.id.get_storage_size()
                size = int(np.prod(shape)) * dset.dtype.itemsize
                if dset.chunks is not None or offset is None or stored != size or offset + stored > file_size:
                    return [f"{name} data is missing, short or past the end of the file"]
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
