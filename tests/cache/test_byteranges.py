"""Rows read as byte ranges of the chunks (byteranges.py) against the backends' own reads.

A cache of three shards (13, 13 and 4 rows: the last chunk of a frame stream and the
last shard are partial) holding the pooled vectors (one chunk per view), a dense frame
stream and a float32 vector stream (a few rows per chunk). Scattered rows, adjacent runs
across chunk edges and the first and last rows of each shard read through ``read_rows``
equal the rows of the whole view read by zarr or HDF5, bit for bit; each run of adjacent
rows is one read of exactly its bytes (or nearby runs one read, with the gap allowance);
a truncated shard is one line naming the file.
"""

import os

import numpy as np
import pytest
from cache_builders import BACKENDS, make_manifest, make_meta

import mrlcache.cache as cache
from mrlcache.cache import byteranges, layout
from mrlcache.cache.format import DamagedCacheError

N, VIEWS, T, SHARD = 30, 3, 5, 13
STREAMS = {
    "pooled": {"kind": "vector", "shape": [16], "ragged": False, "frame_rate": None, "dtype": "float16"},
    "fbank": {"kind": "frames", "shape": [8], "ragged": False, "frame_rate": 100.0, "dtype": "float16", "frames": T},
    "layers": {"kind": "vector", "shape": [3, 4], "ragged": False, "frame_rate": None, "dtype": "float32"},
}


@pytest.fixture(params=[(b, gap) for b in BACKENDS for gap in (0, byteranges.GAP_BYTES)],
                ids=lambda p: f"{p[0]}-gap{p[1]}")
def shards(request, tmp_path, monkeypatch):
    backend, gap = request.param
    monkeypatch.setattr(byteranges, "GAP_BYTES", gap)  # 0: one read per run; else nearby runs share one
    monkeypatch.setattr(layout, "CHUNK_BYTES", 3 * 8 * T * 2)  # fbank: 3 rows per chunk
    rng = np.random.default_rng(3)
    data = {"pooled": rng.standard_normal((N, VIEWS, 16)), "fbank": rng.standard_normal((N, VIEWS, 8, T)),
            "layers": rng.standard_normal((N, VIEWS, 3, 4))}
    meta = make_meta(views=VIEWS, dtype="float16", shard_size=SHARD, streams=STREAMS)
    writer = cache.CacheWriter(tmp_path / "c", meta, make_manifest(N), backend=backend)
    for k in range(writer.num_shards):
        rows = list(writer.shard_rows(k))
        writer.write_shard(k, rows, data["pooled"][rows], {}, 1.0, {n: data[n][rows] for n in ("fbank", "layers")})
    writer.finish()
    writer.close()
    return cache.open(tmp_path / "c", verify=True).shards


def picks(n: int) -> list[np.ndarray]:
    """Increasing distinct rows of a shard of ``n``: edges, runs across chunk edges, scattered."""
    rng = np.random.default_rng(n)
    return [np.arange(n), np.array([0]), np.array([n - 1]), np.array([0, n - 1]),
            np.unique(np.r_[0, 2, 3, 4, n - 2, n - 1] % n),
            np.sort(rng.choice(n, max(1, n // 2), replace=False)), np.arange(0)]


def test_read_rows_equals_the_backends_whole_view(shards):
    assert [len(s) for s in shards] == [13, 13, 4]
    for shard in shards:
        backend = shard._backend
        for name, record in shard.streams.items():
            for view in range(VIEWS):
                whole = backend.read_array(shard.path, name, (slice(None), view))  # (n, *item) as stored
                for rows in picks(len(shard)):
                    out = np.full((len(rows), *record.item_shape), np.nan, record.dtype)
                    got = backend.read_rows(shard.path, name, view, np.unique(rows), out)
                    assert got is out and got.dtype == whole.dtype
                    np.testing.assert_array_equal(got.view(np.uint8), whole[rows].view(np.uint8))
                    if len(rows):  # and the backend's own row selection (the reader before)
                        chosen = backend.read_array(shard.path, name, (rows, view))
                        np.testing.assert_array_equal(got.view(np.uint8), chosen.view(np.uint8))


def test_shard_read_of_rows_in_any_order_equals_the_whole_read(shards):
    shard = shards[0]
    rows = np.array([12, 0, 5, 4, 5, 11])  # any order, repeats
    for name in STREAMS:
        whole = shard.read(name, dtype=np.float32)  # every view, no rows: the backend's read
        np.testing.assert_array_equal(shard.read(name, rows=rows), whole[rows])
        for view in range(VIEWS):
            np.testing.assert_array_equal(shard.read(name, view=view, rows=rows), whole[rows, view])
            got = shard.read(name, view=view, rows=rows, dtype=np.float16)
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, whole[rows, view].astype(np.float16))


def test_each_run_of_adjacent_rows_is_one_read_of_its_bytes(shards, monkeypatch):
    """Without a gap allowance each run is one read of exactly its rows; with one, runs in
    a chunk closer than it share a read spanning them (the gap dropped)."""
    reads = []
    preadv = os.preadv
    monkeypatch.setattr(byteranges.os, "preadv", lambda fd, bufs, offset: reads.append(
        (offset, [len(b) for b in bufs])) or preadv(fd, bufs, offset))
    shard = shards[0]
    row = 8 * T * 2  # fbank, one view of one row, float16: 3 rows per chunk
    shard.read("fbank", view=2, rows=[1, 2, 3, 4, 5, 9, 12])  # chunks {0-2} {3-5} {9-11} {12}
    assert [sum(n) for _, n in reads] == [2 * row, 3 * row, row, row]  # runs in different chunks
    reads.clear()
    shard.read("pooled", view=1, rows=[0, 1, 2, 7, 12])  # one chunk per view
    vec = 16 * 2
    if byteranges.GAP_BYTES == 0:
        assert [n for _, n in reads] == [[3 * vec], [vec], [vec]]
        assert reads[1][0] - reads[0][0] == 7 * vec
    else:  # one read: rows 0-2, 4 rows dropped, row 7, 4 dropped, row 12
        assert [n for _, n in reads] == [[3 * vec, 4 * vec, vec, 4 * vec, vec]]


def test_a_truncated_shard_is_one_line_naming_the_file(shards):
    shard = shards[1]
    if shard.path.is_dir():  # zarr: the chunk file of view 1
        victim = shard.path / "pooled" / "c" / "0" / "1" / "0"
    else:
        victim = shard.path
    os.truncate(victim, os.path.getsize(victim) - 7)
    with pytest.raises(DamagedCacheError) as err:
        shard.read("pooled", view=1, rows=[0, 12])
    message = str(err.value)
    assert "\n" not in message and str(victim) in message and "mrlcache check" in message
