"""CacheWriter: resume writes only missing shards, leftovers are cleaned, shards check their
rows, other settings and foreign directories are refused, failed writes leave nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mrlcache.cache as cache
from mrlcache.corpus import Utterance

from cache_builders import BACKENDS, D, OK_ROWS, V, make_manifest, make_meta, vectors, write_cache


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_shard_write_leaves_nothing(tmp_path, backend, monkeypatch):
    writer = cache.CacheWriter(tmp_path / "c", make_meta(), make_manifest(10), backend=backend)
    real_write = writer.backend.write

    def write_then_fail(path, attrs, arrays):
        real_write(path, attrs, arrays)  # the whole shard is on disk, under its temp name
        assert Path(path).name.startswith(".shard-00001.tmp-r0-")
        raise OSError("disk full")

    monkeypatch.setattr(writer.backend, "write", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        writer.write_shard(1, [4, 5, 6, 7], vectors(10)[4:8], {}, 1.0)
    assert writer.done_shards() == set() and list((tmp_path / "c" / "shards").iterdir()) == []
    writer.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_utterance_cache_whose_index_and_vector_are_all_zero_is_complete(tmp_path, backend):
    # Row 0 alone: its index chunk holds only the fill value 0, and a silent-looking vector
    # of zeros is a legitimate value too; both must be on disk, or the shard reads as damaged.
    manifest = make_manifest(1)
    with cache.CacheWriter(tmp_path / "c", make_meta(), manifest, backend=backend) as writer:
        writer.write_shard(0, [0], np.zeros((1, V, D), np.float32), {}, 1.0)
        summary = writer.finish()
    assert summary["utterances"] == 1
    opened = cache.open(tmp_path / "c", verify=True)
    np.testing.assert_array_equal(opened.read("pooled"), np.zeros((1, V, D), np.float32))
    assert list(opened.index_of([manifest[0].utt_id])) == [0]
