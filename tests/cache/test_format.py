"""The layout rules of mrlcache/cache/format.py: names, manifest text, cache.json checks."""

from __future__ import annotations

import hashlib
import json

import pytest

import mrlcache.cache as cache
from cache_builders import make_manifest, make_meta, write_cache
from mrlcache.cache import format as fmt
from mrlcache.corpus import Utterance


def test_shard_names_and_counts():
    assert fmt.shard_name(3, "zarr") == "shard-00003.zarr" and fmt.shard_name(12, "hdf5") == "shard-00012.h5"
    assert [fmt.num_shards(n, 4) for n in (1, 4, 5, 8, 10)] == [1, 1, 2, 2, 3]
    assert fmt.shard_rows(2, 4, 10) == range(8, 10)
    assert fmt.TMP_RE.match(".shard-00001.tmp-r2-345").groups() == ("00001", "2", "345")


def test_manifest_text_reads_back(tmp_path):
    manifest = make_manifest(3) + [Utterance("eval/x.wav", "/data/eval/x.wav", None)]
    (tmp_path / "m.tsv").write_text(fmt.manifest_text(manifest))
    utt_ids, speakers, paths = fmt.read_manifest(tmp_path / "m.tsv")
    assert utt_ids == [u.utt_id for u in manifest] and speakers == ["id00000", "id00001", "id00002", ""]
    assert paths[3] == "/data/eval/x.wav"
    assert (tmp_path / "m.tsv").read_text().splitlines()[0] == "index\tutt_id\tspeaker\tpath"
    with pytest.raises(ValueError, match="tabs and newlines"):
        fmt.manifest_text([Utterance("a\tb", "/x", "s")])
    (tmp_path / "bad.tsv").write_text("index\tutt_id\tspeaker\tpath\n5\ta\ts\t/x\n")
    with pytest.raises(cache.CacheError, match="line 2"):
        fmt.read_manifest(tmp_path / "bad.tsv")


def test_cache_json_records_version_and_manifest_hash(tmp_path):
    write_cache(tmp_path / "c").close()
    meta = cache.read_meta(tmp_path / "c")
    assert cache.FORMAT_VERSION == 2 and meta["format_version"] == 2 and meta["num_utterances"] == 10
    digest = hashlib.sha256((tmp_path / "c" / "manifest.tsv").read_bytes()).hexdigest()
    assert meta["manifest_sha256"] == digest
    # Moved data (other paths) is the same cache: the hash is not a setting.
    moved = [Utterance(u.utt_id, "/mnt" + u.path, u.speaker) for u in make_manifest(10)]
    cache.CacheWriter(tmp_path / "c", make_meta(), moved).close()
    assert cache.read_meta(tmp_path / "c")["manifest_sha256"] == digest


def test_read_meta_accepts_versions_1_and_2_only(tmp_path):
    write_cache(tmp_path / "c").close()
    path = tmp_path / "c" / "cache.json"
    meta = json.loads(path.read_text())
    for version in (1, 2):
        path.write_text(json.dumps({**meta, "format_version": version}))
        assert cache.read_meta(tmp_path / "c")["format_version"] == version
    path.write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(cache.FormatVersionError, match="reads versions 1, 2"):
        cache.read_meta(tmp_path / "c")
    path.write_text(json.dumps({**meta, "format": "parquet"}))
    with pytest.raises(cache.CacheError, match="unknown format 'parquet'; known: zarr, hdf5"):
        cache.read_meta(tmp_path / "c")
    path.write_text(json.dumps({k: v for k, v in meta.items() if k != "views"}))
    with pytest.raises(cache.NotACacheError, match="lacks views"):
        cache.read_meta(tmp_path / "c")
    path.write_text("{not json")
    with pytest.raises(cache.NotACacheError, match="unreadable"):
        cache.read_meta(tmp_path / "c")


def test_face_exports_exactly_the_contract():
    assert sorted(cache.__all__) == sorted([
        "open", "CacheWriter", "Cache", "Shard", "read_meta", "BACKENDS", "register_backend", "verify_by_default",
        "FORMAT_VERSION", "CacheError", "NotACacheError", "FormatVersionError",
        "IncompleteCacheError", "SettingsMismatchError", "CacheLockedError",
    ])
    assert all(hasattr(cache, name) for name in cache.__all__)
