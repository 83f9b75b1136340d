"""Tests of mrlcache.cache: every backend round-trips, shards appear atomically, resume
checks refuse other settings, rank locks, and the reader's errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

import mrlcache.cache as cache
from mrlcache.corpus import Utterance

BACKENDS = ["zarr", "hdf5"]
V, D = 3, 16


def make_manifest(n: int) -> list[Utterance]:
    """n utterances of 4 speakers, ids like the VoxCeleb trial lists use."""
    ids = [f"id{i % 4:05d}/vid/{i:05d}.wav" for i in range(n)]
    return [Utterance(u, "/data/" + u, u.split("/")[0]) for u in ids]


def make_meta(**changes) -> dict:
    meta = {
        "model_config": {"F": 72, "C": 16},
        "weights_sha256": "ab" * 32,
        "pooled_dim": D,
        "sample_rate": 16000,
        "mode": "train",
        "crop_seconds": 2.0,
        "max_seconds": None,
        "views": V,
        "augment": {"noise_snr": [5, 20], "reverb": 0.5},
        "seed": 7,
        "dtype": "float32",
        "shard_size": 4,
    }
    meta.update(changes)
    return meta


# Utterance rows that have no vector, with their reason (rows 2 and 9).
SKIPPED_ROWS = {2: "silent", 9: "unreadable"}


def vectors(n: int, views: int = V, dim: int = D) -> np.ndarray:
    """Deterministic vectors for manifest rows 0..n-1: (n, views, dim) float32."""
    return np.random.default_rng(0).standard_normal((n, views, dim)).astype(np.float32)


def write_cache(out, backend="zarr", n=10, shards=None, meta=None, **kwargs):
    """Write the shards ``shards`` (default all) of an n-utterance cache; return the writer."""
    manifest = make_manifest(n)
    meta = meta or make_meta()
    data = vectors(n, meta["views"], meta["pooled_dim"])
    writer = cache.CacheWriter(out, meta, manifest, backend=backend, **kwargs)
    for k in range(writer.num_shards) if shards is None else shards:
        rows = writer.shard_rows(k)
        index = [r for r in rows if r not in SKIPPED_ROWS]
        skipped = {manifest[r].utt_id: SKIPPED_ROWS[r] for r in rows if r in SKIPPED_ROWS}
        writer.write_shard(k, index, data[index], skipped, seconds=2.5 * len(rows))
    return writer


OK_ROWS = [r for r in range(10) if r not in SKIPPED_ROWS]


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
    for v in (0, 2):
        (shard / "pooled" / "c" / "0" / str(v) / "0").write_bytes(b"garbage")
    c = cache.open(tmp_path / "c")
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_writes_only_missing_shards(tmp_path, backend):
    write_cache(tmp_path / "c", backend, shards=[0, 2]).close()
    with pytest.raises(cache.IncompleteCacheError, match="1 of 3 shards missing.*rerun"):
        cache.open(tmp_path / "c")
    partial = cache.open(tmp_path / "c", allow_incomplete=True)
    assert len(partial) == 4 and [s.number for s in partial.iter_shards()] == [0, 2]

    writer = cache.CacheWriter(tmp_path / "c", make_meta(), make_manifest(10), backend=backend)
    assert writer.done_shards() == {0, 2}
    with pytest.raises(cache.IncompleteCacheError, match="1 of 3"):
        writer.finish()
    with pytest.raises(cache.CacheError, match="already written"):
        writer.write_shard(0, [0, 1, 3], vectors(4)[[0, 1, 3]], {make_manifest(10)[2].utt_id: "silent"}, 1.0)
    writer.close()
    write_cache(tmp_path / "c", backend, shards=[1]).finish()
    np.testing.assert_array_equal(cache.open(tmp_path / "c").read("pooled"), vectors(10)[OK_ROWS])


@pytest.mark.parametrize("backend", BACKENDS)
def test_leftover_temp_shard_is_ignored_and_cleaned(tmp_path, backend):
    write_cache(tmp_path / "c", backend, shards=[0]).close()
    shards = tmp_path / "c" / "shards"
    # What a run killed in the middle of shard 1 leaves behind.
    leftover = shards / ".shard-00001.tmp-r0-999999"
    (leftover / "pooled").mkdir(parents=True) if backend == "zarr" else leftover.write_bytes(b"half")
    c = cache.open(tmp_path / "c", allow_incomplete=True)
    assert [s.number for s in c.iter_shards()] == [0]
    writer = cache.CacheWriter(tmp_path / "c", make_meta(), make_manifest(10), backend=backend)
    assert not leftover.exists() and writer.done_shards() == {0}
    writer.close()


def test_write_shard_checks_its_rows(tmp_path):
    writer = cache.CacheWriter(tmp_path / "c", make_meta(), make_manifest(10))
    data = vectors(10)
    with pytest.raises(ValueError, match="cover manifest rows 0..3"):
        writer.write_shard(0, [0, 1, 3], data[[0, 1, 3]], {}, 1.0)  # row 2 unaccounted for
    with pytest.raises(ValueError, match="shape"):
        writer.write_shard(0, [0, 1, 2, 3], data[[0, 1, 2, 3], :2], {}, 1.0)
    bad = data[:4].copy()
    bad[1, 0, 0] = 1e6  # fine in float32, infinite in float16
    writer.close()
    writer = cache.CacheWriter(tmp_path / "h", make_meta(dtype="float16"), make_manifest(10))
    with pytest.raises(ValueError, match="--dtype float32"):
        writer.write_shard(0, [0, 1, 2, 3], bad, {}, 1.0)
    assert writer.done_shards() == set() and list((tmp_path / "h" / "shards").iterdir()) == []
    writer.close()


def test_shard_with_no_vectors(tmp_path):
    manifest = make_manifest(2)
    writer = cache.CacheWriter(tmp_path / "c", make_meta(shard_size=2), manifest, backend="hdf5")
    skipped = {manifest[0].utt_id: "empty", manifest[1].utt_id: "truncated"}
    writer.write_shard(0, [], np.zeros((0, V, D)), skipped, 0.0)
    assert writer.finish()["skipped_by_reason"] == {"empty": 1, "truncated": 1}
    c = cache.open(tmp_path / "c")
    assert len(c) == 0 and c.read("pooled").shape == (0, V, D) and len(c.skipped) == 2


def test_other_settings_are_refused(tmp_path):
    write_cache(tmp_path / "c", shards=[0]).close()
    with pytest.raises(cache.SettingsMismatchError, match=r"\(crop_seconds, weights_sha256\).*--overwrite"):
        meta = make_meta(crop_seconds=3.0, weights_sha256="cd" * 32)
        cache.CacheWriter(tmp_path / "c", meta, make_manifest(10))
    with pytest.raises(cache.SettingsMismatchError, match="format"):
        cache.CacheWriter(tmp_path / "c", make_meta(), make_manifest(10), backend="hdf5")
    with pytest.raises(cache.SettingsMismatchError, match="utterance list"):
        cache.CacheWriter(tmp_path / "c", make_meta(), make_manifest(11))
    relabelled = [Utterance(u.utt_id, u.path, "other") for u in make_manifest(10)]
    with pytest.raises(cache.SettingsMismatchError, match="utterance list"):
        cache.CacheWriter(tmp_path / "c", make_meta(), relabelled)
    # Tuples and lists are the same setting once in JSON; the version may change; the data
    # may have moved to another disk (same ids and speakers).
    meta = make_meta(augment={"noise_snr": (5, 20), "reverb": 0.5}, mrlcache_version="9.9")
    moved = [Utterance(u.utt_id, "/mnt" + u.path, u.speaker) for u in make_manifest(10)]
    cache.CacheWriter(tmp_path / "c", meta, moved).close()
    assert cache.open(tmp_path / "c", allow_incomplete=True).meta["seed"] == 7


def test_overwrite(tmp_path):
    write_cache(tmp_path / "c", shards=[0, 1]).close()
    (tmp_path / "c" / "extract.yaml").write_text("seed: 7\n")  # written by extract beside the cache
    writer = cache.CacheWriter(tmp_path / "c", make_meta(crop_seconds=3.0), make_manifest(10), overwrite=True)
    assert writer.done_shards() == set() and (tmp_path / "c" / "extract.yaml").exists()
    writer.close()
    assert cache.open(tmp_path / "c", allow_incomplete=True).meta["crop_seconds"] == 3.0


def test_non_cache_directory_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.wav").write_bytes(b"RIFF")
    for overwrite in (False, True):
        with pytest.raises(cache.NotACacheError, match="not empty and is not an mrlcache cache"):
            cache.CacheWriter(tmp_path / "data", make_meta(), make_manifest(10), overwrite=overwrite)
    assert (tmp_path / "data" / "precious.wav").exists()
    cache.CacheWriter(tmp_path / "empty", make_meta(), make_manifest(10)).close()  # new dir is fine
    # What another rank that arrived first leaves before manifest.tsv exists is fine too.
    (tmp_path / "starting" / "shards").mkdir(parents=True)
    (tmp_path / "starting" / "locks").mkdir()
    cache.CacheWriter(tmp_path / "starting", make_meta(), make_manifest(10), rank=1).close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(cache.NotACacheError, match="is a file"):
        cache.CacheWriter(tmp_path / "file", make_meta(), make_manifest(10))


def test_reader_errors(tmp_path):
    with pytest.raises(cache.NotACacheError, match="no such cache"):
        cache.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(cache.NotACacheError, match="not an mrlcache cache"):
        cache.open(tmp_path / "plain")
    write_cache(tmp_path / "c").close()
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    (tmp_path / "c" / "cache.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(cache.FormatVersionError, match="format_version 99"):
        cache.open(tmp_path / "c")


def test_index_of(tmp_path):
    write_cache(tmp_path / "c").close()
    c = cache.open(tmp_path / "c")
    ids = [c.utterances[5], c.utterances[0]]
    np.testing.assert_array_equal(c.index_of(ids), [5, 0])
    np.testing.assert_array_equal(c.read("pooled")[c.index_of(ids)], vectors(10)[OK_ROWS][[5, 0]])
    with pytest.raises(KeyError, match=r"2 utterance ids.*\(skipped: silent\).*nope"):
        c.index_of([make_manifest(10)[2].utt_id, "nope"])


HOLD_LOCK = textwrap.dedent(
    """
    import sys
    import mrlcache.cache as cache
    from test_cache import make_manifest, make_meta
    writer = cache.CacheWriter(sys.argv[1], make_meta(), make_manifest(10), rank=0)
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_rank_locks(tmp_path):
    out = tmp_path / "c"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(cache.CacheLockedError, match="rank 0"):
            cache.CacheWriter(out, make_meta(), make_manifest(10), rank=0)
        with pytest.raises(cache.CacheLockedError, match="cannot overwrite"):
            cache.CacheWriter(out, make_meta(), make_manifest(10), rank=0, overwrite=True)
        # Another rank writes side by side with the live rank 0.
        rank1 = cache.CacheWriter(out, make_meta(), make_manifest(10), rank=1)
        rank1.write_shard(2, [8], vectors(10)[[8]], {make_manifest(10)[9].utt_id: "unreadable"}, 1.0)
        rank1.close()
    finally:
        holder.kill()  # like kill -9: the kernel releases the flock
        holder.wait()
    writer = cache.CacheWriter(out, make_meta(), make_manifest(10), rank=0)
    assert writer.done_shards() == {2}
    writer.close()


def test_temp_shard_of_a_live_rank_is_kept(tmp_path):
    out = tmp_path / "c"
    rank1 = cache.CacheWriter(out, make_meta(), make_manifest(10), rank=1)
    in_progress = out / "shards" / ".shard-00001.tmp-r1-12345"
    in_progress.mkdir()
    cache.CacheWriter(out, make_meta(), make_manifest(10), rank=0).close()
    assert in_progress.exists()  # rank 1 still holds its lock: its shard in progress survives
    rank1.close()
    cache.CacheWriter(out, make_meta(), make_manifest(10), rank=0).close()
    assert not in_progress.exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_shard_write_leaves_nothing(tmp_path, backend, monkeypatch):
    writer = cache.CacheWriter(tmp_path / "c", make_meta(), make_manifest(10), backend=backend)
    real_write = writer.backend.write

    def write_then_fail(path, pooled, index, attrs):
        real_write(path, pooled, index, attrs)  # the whole shard is on disk, under its temp name
        assert Path(path).name.startswith(".shard-00001.tmp-r0-")
        raise OSError("disk full")

    monkeypatch.setattr(writer.backend, "write", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        writer.write_shard(1, [4, 5, 6, 7], vectors(10)[4:8], {}, 1.0)
    assert writer.done_shards() == set() and list((tmp_path / "c" / "shards").iterdir()) == []
    writer.close()
