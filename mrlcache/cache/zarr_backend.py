"""Zarr v3 shard files: one group per shard, one array per stored array, no compression.

Layout of ``shard-00000.zarr`` (a zarr v3 group, see docs/cache-format.md): the arrays of
layout.py (``pooled`` (n_ok, V, D) in chunks (n_ok, 1, D), so the chunk file
``pooled/c/0/<v>/0`` is exactly the raw little-endian bytes of view v; ``index``; the
other streams) and the group attributes (the shard's numbers and its skipped utterances
``{utt_id: reason}``). Rows of one view are read as byte ranges of those chunk files
(:meth:`ZarrBackend.read_rows`, byteranges.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import zarr
from zarr.buffer.cpu import NDBuffer
from zarr.storage import LocalStore

from mrlcache.cache.backends import register_backend
from mrlcache.cache.byteranges import by_chunk, read_rows_at

RAW = [{"name": "bytes", "configuration": {"endian": "little"}}]  # the codecs of an uncompressed array


def _group(path):
    return zarr.open_group(LocalStore(str(path), read_only=True), mode="r")


@register_backend
class ZarrBackend:
    """Writes and reads one shard as a zarr v3 group (a directory)."""

    name = "zarr"
    suffix = ".zarr"

    @staticmethod
    def write(path, attrs: dict, arrays: dict) -> None:
        """Write a complete shard at ``path`` (must not exist); chunks None: one chunk."""
        group = zarr.open_group(LocalStore(str(path)), mode="w-", attributes=attrs)
        for name, (data, chunks) in arrays.items():
            # write_empty_chunks keeps an all-zero chunk on disk (a view of zeros, the index
            # [0] of a one-row shard 0), so every shard has the same files. It is a runtime
            # setting: write through the array create_array returned, not a reopened one.
            array = group.create_array(name, shape=data.shape, chunks=chunks or tuple(max(s, 1) for s in data.shape),
                                       dtype=data.dtype, compressors=None, fill_value=0,
                                       config={"write_empty_chunks": True})
            if data.size:
                array[...] = data

    @staticmethod
    def read_meta(path) -> tuple[dict, dict]:
        """Return (attrs, {array name: shape}) of the shard at ``path``."""
        group = _group(path)
        return dict(group.attrs), {name: tuple(array.shape) for name, array in group.arrays()}

    @staticmethod
    def read_array(path, name: str, selection=(), out: np.ndarray | None = None) -> np.ndarray:
        """``array[selection]`` of the shard's array ``name``: ints, slices and at most one
        increasing int array (rows); only the chunks the selection touches are read. In the
        stored dtype zarr decodes straight into ``out``; otherwise numpy converts."""
        array = _group(path)[name]
        selection = tuple(selection) + (slice(None),) * (array.ndim - len(selection))
        orthogonal = any(isinstance(s, np.ndarray) for s in selection)
        if out is not None and not orthogonal and out.dtype == array.dtype:
            if out.size:
                array.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out))
            return out
        data = np.asarray(array.get_orthogonal_selection(selection) if orthogonal
                          else array.get_basic_selection(selection))
        if out is None:
            return data
        np.copyto(out, data, casting="same_kind")
        return out

    @staticmethod
    def read_rows(path, name: str, view: int, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (increasing, distinct) of view ``view`` of the dense array ``name``
        into ``out`` ((len(rows), *item), the stored dtype): the rows' bytes of the chunk
        files, read from zarr.json's layout without zarr (one chunk: some rows x 1 view)."""
        if not len(rows):
            return out
        meta = json.loads((Path(path) / name / "zarr.json").read_text())
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        codecs = [{"name": c["name"], "configuration": c.get("configuration", {})} for c in meta["codecs"]]
        dtype = np.dtype(meta["data_type"])
        if (codecs != RAW and not (dtype.itemsize == 1 and codecs == [{"name": "bytes", "configuration": {}}])) \
                or meta["chunk_key_encoding"]["name"] != "default" or chunks[1] != 1 or chunks[2:] != shape[2:]:
            raise ValueError(f"{Path(path) / name}: not an uncompressed array of one view per chunk "
                             "(not written by mrlcache)")
        if out.dtype != dtype or out.shape != (len(rows), *shape[2:]):
            raise ValueError(f"{Path(path) / name}: rows of {dtype} {tuple(shape[2:])} cannot be read into "
                             f"{out.dtype} {out.shape}")
        per_chunk = chunks[0]
        size = per_chunk * math.prod(shape[2:]) * dtype.itemsize
        sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        for c, a, b in by_chunk(rows, per_chunk):
            key = sep.join(["c", str(c), str(int(view))] + ["0"] * (len(shape) - 2))
            read_rows_at(Path(path) / name / key, [(0, size, rows[a:b] - c * per_chunk, slice(a, b))], out)
        return out

    @staticmethod
    def array_bytes(path, name: str) -> int:
        """Bytes on disk of the shard's array ``name`` (its chunk files)."""
        root = Path(path) / name
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")

    @staticmethod
    def check_array(path, name: str, shape: tuple, dtype, chunks: tuple | None) -> list[str]:
        """Problems of the array ``name``: missing, wrong shape/dtype/chunks, chunk files missing
        or short (a missing chunk would read back as zeros without error; chunks are
        uncompressed, so each chunk file holds exactly its bytes, edge chunks whole)."""
        group = _group(path)
        if name not in group:
            return [f"array {name} is missing"]
        array = group[name]
        chunks = tuple(chunks) if chunks is not None else tuple(max(s, 1) for s in shape)
        if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
            return [f"{name} is {array.dtype} {tuple(array.shape)}, expected {np.dtype(dtype)} {tuple(shape)}"]
        if 0 in shape:
            return []
        if tuple(array.chunks) != chunks:
            return [f"{name} chunks {array.chunks}, expected {chunks} (not written by mrlcache)"]
        size = int(np.prod(chunks)) * array.dtype.itemsize
        grid = [range(-(-s // c)) for s, c in zip(shape, chunks)]
        root = Path(path) / name / "c"
        for key in np.ndindex(*(len(g) for g in grid)):
            file = root.joinpath(*map(str, key))
            if not file.is_file():
                return [f"{name} chunk {'/'.join(map(str, key))} ({file.relative_to(Path(path))}) is missing"]
            if file.stat().st_size != size:
                return [f"{name} chunk {'/'.join(map(str, key))} ({file.relative_to(Path(path))}) has "
                        f"{file.stat().st_size} bytes, expected {size}"]
        return []
