"""Frame streams in the shards: dense and ragged round trips, rows, f0 markers, damage."""

import shutil

import numpy as np
import pytest
from cache_builders import BACKENDS, make_manifest, make_meta

import mrlcache.cache as cache
from mrlcache.streams import StreamRecord
from mrlcache.cache.format import DamagedCacheError

V, N, T = 2, 10, 7


def stream_meta(mode="train"):
    ragged = mode == "eval"
    frames = {} if ragged else {"frames": T}
    views = 1 if ragged else V
    return make_meta(views=views, mode=mode, dtype="float16", streams={
        "pooled": {"kind": "vector", "shape": [16], "ragged": False, "frame_rate": None, "dtype": "float16"},
        "fbank": {"kind": "frames", "shape": [80], "ragged": ragged, "frame_rate": 100.0, "dtype": "float16", **frames},
        "f0": {"kind": "frames", "shape": [2], "ragged": ragged, "frame_rate": 100.0, "dtype": "float16", **frames},
        "layers": {"kind": "vector", "shape": [3, 8], "ragged": False, "frame_rate": None, "dtype": "float32"},
    })


def data(mode):
    rng = np.random.default_rng(1)
    views = 1 if mode == "eval" else V
    lengths = rng.integers(3, 12, N) if mode == "eval" else np.full(N, T)
    fbank = [rng.standard_normal((views, 80, t)).astype(np.float32) for t in lengths]
    f0 = [np.stack([rng.uniform(60, 400, (views, t)), rng.uniform(0, 1, (views, t))], axis=1) for t in lengths]
    for x in f0:
        x[:, 0, ::3] = np.nan  # unvoiced frames
    return {
        "pooled": rng.standard_normal((N, views, 16)).astype(np.float32),
        "fbank": fbank, "f0": f0,
        "layers": rng.standard_normal((N, views, 3, 8)).astype(np.float32),
    }


def write(out, backend, mode, shards=None):
    meta, d = stream_meta(mode), data(mode)
    writer = cache.CacheWriter(out, meta, make_manifest(N), backend=backend)
    for k in range(writer.num_shards) if shards is None else shards:
        rows = list(writer.shard_rows(k))
        others = {"layers": d["layers"][rows]}
        for name in ("fbank", "f0"):
            items = [d[name][r] for r in rows]
            others[name] = [x[0] for x in items] if mode == "eval" else np.stack(items)
        writer.write_shard(k, rows, d["pooled"][rows], {}, 1.0, others)
    writer.finish()
    writer.close()
    return d


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_round_trip_with_rows_and_views(tmp_path, backend):
    d = write(tmp_path / "c", backend, "train")
    c = cache.open(tmp_path / "c", verify=True)
    assert c.streams["fbank"] == StreamRecord("fbank", "frames", (80,), "float16", 100.0, False, T)
    assert c.streams["f0"].encoding == "nan-as-zero" and c.streams["f0"].chunking == "rows"
    fbank = c.read("fbank")
    assert fbank.shape == (N, V, 80, T) and fbank.dtype == np.float32
    np.testing.assert_array_equal(fbank, np.stack(d["fbank"]).astype(np.float16).astype(np.float32))
    f0 = c.read("f0", view=1)
    want = np.stack(d["f0"])[:, 1].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(f0, want)  # NaN (unvoiced) where the tracker put it
    assert np.isnan(f0[:, 0, ::3]).all() and np.isfinite(f0[:, 0, 1::3]).all()
    rows = np.array([9, 0, 5, 5])
    np.testing.assert_array_equal(c.read("fbank", view=0, rows=rows), fbank[rows, 0])
    np.testing.assert_array_equal(c.read("layers", rows=rows), d["layers"][rows])  # float32 stream
    np.testing.assert_array_equal(c.read("pooled", rows=rows), c.read("pooled")[rows])
    assert c.read("layers").shape == (N, V, 3, 8)
    summary = cache.read_meta(tmp_path / "c")["summary"]
    assert set(summary["stream_bytes"]) == {"pooled", "fbank", "f0", "layers"}
    assert summary["stream_bytes"]["fbank"] >= N * V * 80 * T * 2
    with pytest.raises(KeyError, match="holds 'f0', 'fbank', 'layers', 'pooled'"):
        c.read("mfcc")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_round_trip_with_rows(tmp_path, backend):
    d = write(tmp_path / "c", backend, "eval")
    c = cache.open(tmp_path / "c", verify=True)
    assert c.streams["f0"].ragged and c.shards[0].offsets("fbank").dtype == np.int64
    fbank = c.read("fbank")
    assert isinstance(fbank, list) and len(fbank) == N
    for got, want in zip(fbank, d["fbank"]):
        np.testing.assert_array_equal(got, want[0].astype(np.float16).astype(np.float32))
    picked = c.read("f0", view=0, rows=[7, 2])
    for got, r in zip(picked, [7, 2]):
        np.testing.assert_array_equal(got, d["f0"][r][0].astype(np.float16).astype(np.float32))
    with pytest.raises(IndexError, match="holds 1 views"):
        c.shards[0].read("fbank", view=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_read_only_their_shards(tmp_path, backend):
    write(tmp_path / "c", backend, "train")
    c = cache.open(tmp_path / "c")
    expected = c.read("fbank", rows=[0, 3])
    shutil.rmtree(c.shards[1].path) if c.shards[1].path.is_dir() else c.shards[1].path.unlink()
    np.testing.assert_array_equal(c.read("fbank", rows=[0, 3]), expected)  # shard 0 only
    with pytest.raises(Exception):
        c.read("fbank", rows=[5])


def test_writer_refuses_non_finite_frames_but_not_unvoiced_f0(tmp_path):
    meta, d = stream_meta("train"), data("train")
    writer = cache.CacheWriter(tmp_path / "c", meta, make_manifest(N))
    rows = list(writer.shard_rows(0))
    fbank = np.stack([d["fbank"][r] for r in rows])
    fbank[2, 1, 5, 3] = np.inf
    others = {"layers": d["layers"][rows], "f0": np.stack([d["f0"][r] for r in rows]), "fbank": fbank}
    with pytest.raises(ValueError, match=r"1 items of stream fbank are not finite, first 'id00002"):
        writer.write_shard(0, rows, d["pooled"][rows], {}, 1.0, others)
    others["fbank"][2, 1, 5, 3] = 0.0
    others["f0"][0, 0, 1, 4] = np.nan  # periodicity is defined on every frame
    with pytest.raises(ValueError, match="stream f0 are not finite"):
        writer.write_shard(0, rows, d["pooled"][rows], {}, 1.0, others)
    others["f0"][0, 0, 1, 4] = 0.5
    writer.write_shard(0, rows, d["pooled"][rows], {}, 1.0, others)  # NaN F0 rows are fine
    with pytest.raises(ValueError, match="streams given"):
        writer.write_shard(1, list(writer.shard_rows(1)), d["pooled"][4:8], {}, 1.0, {})
    writer.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_frame_stream_is_caught_and_rewritten(tmp_path, backend):
    write(tmp_path / "c", backend, "eval")
    path = cache.open(tmp_path / "c").shards[1].path
    if backend == "zarr":
        chunk = next(p for p in (path / "fbank" / "c").rglob("*") if p.is_file())
        raw = bytearray(chunk.read_bytes())
        raw[10] ^= 0xFF
        chunk.write_bytes(bytes(raw))
        with pytest.raises(DamagedCacheError, match="fbank checksum mismatch"):
            cache.open(tmp_path / "c", verify=True)
        chunk.write_bytes(bytes(raw[:-4]))  # short chunk: caught without reading values
    else:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size - 64)
    with pytest.raises(DamagedCacheError, match="shard-00001"):
        cache.open(tmp_path / "c")
    writer = cache.CacheWriter(tmp_path / "c", stream_meta("eval"), make_manifest(N), backend=backend)
    assert 1 not in writer.done_shards()
    writer.close()
    write(tmp_path / "c", backend, "eval", shards=[1])  # the rerun rewrites it
    cache.open(tmp_path / "c", verify=True)


def test_cache_without_streams_key_holds_pooled_only(tmp_path):
    from cache_builders import write_cache

    write_cache(tmp_path / "c").close()
    c = cache.open(tmp_path / "c")
    assert "streams" not in cache.read_meta(tmp_path / "c")
    # read back as the typed record of a dense vector stream, one chunk per view
    assert c.streams == {"pooled": StreamRecord("pooled", "vector", (16,), "float32", None, chunking="view")}
    np.testing.assert_array_equal(c.read("pooled", view=2, rows=[3, 0]), c.read("pooled", view=2)[[3, 0]])
