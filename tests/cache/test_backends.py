"""Every registered backend round-trips through the registry; each format's chunking and
its reading without mrlcache."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import zarr

import mrlcache.cache as cache
from cache_builders import BACKENDS, D, OK_ROWS, V, make_manifest, make_meta, vectors, write_cache


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, backend, dtype):
    writer = write_cache(tmp_path / "c", backend, meta=make_meta(dtype=dtype))
    summary = writer.finish({"utterances_per_second": 12.5})
    writer.close()
    expected = vectors(10)[OK_ROWS].astype(dtype).astype(np.float32)  # what the stored dtype keeps
    manifest = make_manifest(10)

    c = cache.open(tmp_path / "c")
    assert len(c) == 8 and c.num_views == V and c.dim == D
    assert c.utterances == [manifest[r].utt_id for r in OK_ROWS]
    assert c.speakers == [manifest[r].speaker for r in OK_ROWS]
    assert c.skipped == {manifest[2].utt_id: "silent", manifest[9].utt_id: "unreadable"}
    assert c.meta["format"] == backend and c.meta["dtype"] == dtype and c.meta["seed"] == 7
    assert c.meta["augment"] == {"noise_snr": [5, 20], "reverb": 0.5}

    everything = c.read("pooled")
    assert everything.dtype == np.float32 and everything.shape == (8, V, D)
    np.testing.assert_array_equal(everything, expected)
    for v in range(V):
        np.testing.assert_array_equal(c.read("pooled", view=v), expected[:, v])
    assert c.read("pooled", view=1, dtype=np.float16).dtype == np.float16
    with pytest.raises(IndexError, match="3 views"):
        c.read("pooled", view=V)

    shards = list(c.iter_shards())
    assert [len(s) for s in shards] == [3, 4, 1]  # rows 0-3 minus 2, 4-7, 8-9 minus 9
    assert sum((s.utterances for s in shards), []) == c.utterances
    np.testing.assert_array_equal(np.concatenate([s.read("pooled", view=2) for s in shards]), expected[:, 2])
    np.testing.assert_array_equal(shards[1].read("pooled"), expected[3:7])

    assert summary["utterances"] == 8 and summary["skipped"] == 2
    assert summary["skipped_by_reason"] == {"silent": 1, "unreadable": 1}
    assert summary["audio_hours"] == pytest.approx(25.0 / 3600)
    assert summary["utterances_per_second"] == 12.5 and summary["shards"] == 3
    assert c.meta["summary"] == summary


def test_zarr_and_hdf5_hold_the_same_numbers(tmp_path):
    for backend in BACKENDS:
        write_cache(tmp_path / backend, backend, meta=make_meta(dtype="float16")).close()
    z, h = cache.open(tmp_path / "zarr"), cache.open(tmp_path / "hdf5")
    assert z.utterances == h.utterances and z.skipped == h.skipped
    np.testing.assert_array_equal(z.read("pooled", dtype=np.float16), h.read("pooled", dtype=np.float16))
    assert {**z.meta, "format": None} == {**h.meta, "format": None}


def test_zarr_one_view_reads_only_that_views_chunk(tmp_path):
    write_cache(tmp_path / "c", "zarr").close()
    shard = tmp_path / "c" / "shards" / "shard-00001.zarr"
    assert sorted(p.name for p in (shard / "pooled" / "c" / "0").iterdir()) == ["0", "1", "2"]
    # Damage views 0 and 2 of one shard: a read of view 1 that touched them would fail.
    # (Damaged after opening: opening checks every chunk's size and would refuse the cache.)
    c = cache.open(tmp_path / "c")
    for v in (0, 2):
        (shard / "pooled" / "c" / "0" / str(v) / "0").write_bytes(b"garbage")
    np.testing.assert_array_equal(c.read("pooled", view=1), vectors(10)[OK_ROWS][:, 1])
    with pytest.raises(Exception):
        c.read("pooled", view=0)


def test_hdf5_one_chunk_per_view(tmp_path):
    write_cache(tmp_path / "c", "hdf5").close()
    with h5py.File(tmp_path / "c" / "shards" / "shard-00001.h5", "r") as f:
        dset = f["pooled"]
        assert dset.chunks == (4, 1, D) and dset.compression is None
        assert dset.id.get_num_chunks() == V


def test_readable_without_mrlcache(tmp_path):
    """The snippets of docs/cache-format.md: plain zarr, h5py and numpy."""
    for backend in BACKENDS:
        write_cache(tmp_path / backend, backend, meta=make_meta(dtype="float16")).close()
    expected = vectors(10)[[4, 5, 6, 7]].astype(np.float16)
    root = tmp_path / "zarr"
    meta = json.loads((root / "cache.json").read_text())
    group = zarr.open_group(root / "shards" / "shard-00001.zarr", mode="r")
    np.testing.assert_array_equal(group["pooled"][:], expected)
    np.testing.assert_array_equal(group["index"][:], [4, 5, 6, 7])
    rows = [line.rstrip("\n").split("\t") for line in open(root / "manifest.tsv")][1:]
    assert [rows[i][1] for i in group["index"][:]] == [u.utt_id for u in make_manifest(10)[4:8]]
    skipped = zarr.open_group(root / "shards" / "shard-00000.zarr", mode="r").attrs["skipped"]
    assert skipped == {make_manifest(10)[2].utt_id: "silent"}
    raw = np.fromfile(root / "shards" / "shard-00001.zarr" / "pooled" / "c" / "0" / "1" / "0", dtype="<f2")
    np.testing.assert_array_equal(raw.reshape(-1, meta["pooled_dim"]), expected[:, 1])
    with h5py.File(tmp_path / "hdf5" / "shards" / "shard-00001.h5", "r") as f:
        np.testing.assert_array_equal(f["pooled"][:, 1], expected[:, 1])
        assert json.loads(f["skipped_json"][()]) == {}
    with h5py.File(tmp_path / "hdf5" / "shards" / "shard-00000.h5", "r") as f:
        assert json.loads(f["skipped_json"][()]) == {make_manifest(10)[2].utt_id: "silent"}


def test_registry_holds_both_backends_in_order():
    assert list(cache.BACKENDS) == ["zarr", "hdf5"]
    assert [b.suffix for b in cache.BACKENDS.values()] == [".zarr", ".h5"]
    verbs = ("write", "read_meta", "read_array", "check_array", "array_bytes")
    for backend in cache.BACKENDS.values():  # every registered class has the whole protocol
        assert all(callable(getattr(backend, m)) for m in verbs)
    with pytest.raises(ValueError, match="clashes with the registered 'zarr'"):
        cache.register_backend(type("Other", (), {"name": "zarr", "suffix": ".zz"}))
    assert cache.register_backend(cache.BACKENDS["hdf5"]) is cache.BACKENDS["hdf5"]  # idempotent
    assert list(cache.BACKENDS) == ["zarr", "hdf5"]


@pytest.mark.parametrize("name", list(cache.BACKENDS))
def test_every_registered_backend_round_trips_one_shard(tmp_path, name):
    """The array verbs: write named arrays, read their metadata, rows of them, into a buffer, check them."""
    backend = cache.BACKENDS[name]
    pooled = vectors(5).astype(np.float16)
    frames = np.arange(5 * V * 3 * 4, dtype=np.float32).reshape(5, V, 3, 4)
    attrs = {"shard": 0, "rows": [0, 5], "n_ok": 5, "n_skipped": 0, "seconds": 1.5, "skipped": {"u": "empty"}}
    path = tmp_path / f"s{backend.suffix}"
    arrays = {"pooled": (pooled, (5, 1, D)), "index": (np.arange(5, dtype=np.int64), None),
              "frames": (frames, (2, 1, 3, 4))}
    backend.write(path, attrs, arrays)
    read_attrs, shapes = backend.read_meta(path)
    assert read_attrs == attrs and shapes == {"pooled": (5, V, D), "index": (5,), "frames": (5, V, 3, 4)}
    np.testing.assert_array_equal(backend.read_array(path, "index"), np.arange(5))
    out = np.empty((5, D), dtype=np.float32)
    assert backend.read_array(path, "pooled", (slice(None), 2), out=out) is out  # converted into the buffer
    np.testing.assert_array_equal(out, pooled[:, 2].astype(np.float32))
    same = np.empty((5, D), dtype=np.float16)
    np.testing.assert_array_equal(backend.read_array(path, "pooled", (slice(None), 1), out=same), pooled[:, 1])
    rows = np.array([1, 3, 4])
    np.testing.assert_array_equal(backend.read_array(path, "frames", (rows, 2)), frames[rows, 2])
    for name_, (data, chunks) in arrays.items():
        assert backend.check_array(path, name_, data.shape, data.dtype, chunks) == []
    assert "float32" in backend.check_array(path, "pooled", (5, V, D), np.float32, (5, 1, D))[0]
    assert "chunks" in backend.check_array(path, "frames", frames.shape, frames.dtype, (5, 1, 3, 4))[0]
    assert "missing" in backend.check_array(path, "nothing", (5,), np.int64, None)[0]
    assert backend.array_bytes(path, "frames") == 6 * V * 3 * 4 * 4  # 3 chunks of 2 rows per view, edges whole
    with pytest.raises(Exception):
        backend.write(path, attrs, arrays)  # never overwrites a shard
