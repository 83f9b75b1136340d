"""Fault injection: every kind of cache damage is detected with a one-line error naming the
file and the fix, and a rerun of the writer (what rerunning extract does) repairs it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import mrlcache.cache as cache
from cache_builders import BACKENDS, OK_ROWS, SKIPPED_ROWS, make_manifest, make_meta, vectors, write_cache
from mrlcache.cache.format import DamagedCacheError
from mrlcache.cli.check import check
from mrlcache.corpus import Utterance

REPAIR = "rerun the same 'mrlcache extract' command"


def shard_path(out: Path, backend: str, k: int = 1) -> Path:
    return out / "shards" / f"shard-{k:05d}{cache.BACKENDS[backend].suffix}"


def rerun(out: Path, backend: str, verify: bool = False) -> set[int]:
    """What a rerun of extract does: write the shards that are not done, then finish."""
    manifest, data = make_manifest(10), vectors(10)
    with cache.CacheWriter(out, make_meta(), manifest, backend=backend) as writer:
        todo = sorted(set(range(writer.num_shards)) - writer.done_shards(verify=verify))
        for k in todo:
            rows = writer.shard_rows(k)
            index = [r for r in rows if r not in SKIPPED_ROWS]
            skipped = {manifest[r].utt_id: SKIPPED_ROWS[r] for r in rows if r in SKIPPED_ROWS}
            writer.write_shard(k, index, data[index], skipped, seconds=2.5 * len(rows))
        writer.finish({"utterances_per_second": 12.5})
    return set(todo)


def assert_sound(out: Path) -> None:
    c = cache.open(out, verify=True)
    np.testing.assert_array_equal(c.read("pooled"), vectors(10)[OK_ROWS])
    assert c.utterances == [make_manifest(10)[r].utt_id for r in OK_ROWS]
    assert CliRunner().invoke(check, [str(out), "--full"]).exit_code == 0


def check_output(out: Path, *args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(check, [str(out), *args])
    return result.exit_code, result.output.strip().splitlines()


@pytest.fixture(params=BACKENDS)
def written(request, tmp_path):
    """A complete 3-shard cache of 10 utterances in each backend: (out, backend)."""
    out = tmp_path / "c"
    with write_cache(out, request.param) as writer:
        writer.finish({"utterances_per_second": 12.5})
    return out, request.param


# ------------------------------------------------------------------ damage, per backend


def delete_view_chunk(path: Path, backend: str, view: int = 1) -> None:
    """Lose the stored chunk of one view (a zarr chunk file; an HDF5 chunk never written)."""
    if backend == "zarr":
        (path / "pooled" / "c" / "0" / str(view) / "0").unlink()
        return
    with h5py.File(path, "r+") as f:
        data, chunks = f["pooled"][:], f["pooled"].chunks
        del f["pooled"]
        dset = f.create_dataset("pooled", shape=data.shape, dtype=data.dtype, chunks=chunks)
        for v in range(data.shape[1]):
            if v != view:
                dset[:, v] = data[:, v]


def truncate(path: Path, backend: str) -> None:
    target = path / "pooled" / "c" / "0" / "1" / "0" if backend == "zarr" else path
    os.truncate(target, target.stat().st_size // 2)


def flip_vector_byte(path: Path, backend: str) -> None:
    """Change one stored byte of the vectors, keeping every size: only checksums see it."""
    if backend == "zarr":
        target, offset = path / "pooled" / "c" / "0" / "1" / "0", 5
    else:
        with h5py.File(path, "r") as f:
            target, offset = path, f["pooled"].id.get_chunk_info(1).byte_offset + 5
    with open(target, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def delete_index(path: Path, backend: str) -> None:
    if backend == "zarr":
        (path / "index" / "c" / "0").unlink()  # reads back as zeros: every vector "row 0"
    else:
        with h5py.File(path, "r+") as f:
            del f["index"]


def edit_index(path: Path, backend: str) -> None:
    """Point the first vector of shard 1 (rows 4..7) at row 0, which belongs to shard 0."""
    if backend == "zarr":
        index = np.fromfile(path / "index" / "c" / "0", dtype="<i8")
        index[0] = 0
        index.tofile(path / "index" / "c" / "0")
    else:
        with h5py.File(path, "r+") as f:
            f["index"][0] = 0


DAMAGE = {
    "deleted chunk": (delete_view_chunk, "pooled"),
    "truncated": (truncate, "short|unreadable|bytes"),
    "deleted index": (delete_index, "index"),
    "edited index": (edit_index, "outside rows 4..7"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_structural_damage_is_refused_and_repaired(written, damage):
    out, backend = written
    hurt, what = DAMAGE[damage]
    before = cache.open(out).read("pooled")
    hurt(shard_path(out, backend), backend)
    with pytest.raises(DamagedCacheError, match=rf"shard-00001.*damaged shard.*({what}).*{REPAIR}") as err:
        cache.open(out)
    assert "\n" not in str(err.value)
    code, lines = check_output(out)
    assert code == 1 and len(lines) == 1 and "shard-00001" in lines[0] and REPAIR in lines[0]

    assert rerun(out, backend) == {1}  # only the damaged shard is written again
    assert_sound(out)
    np.testing.assert_array_equal(cache.open(out).read("pooled"), before)


def test_corrupted_bytes_are_found_by_the_checksums(written):
    out, backend = written
    flip_vector_byte(shard_path(out, backend), backend)
    c = cache.open(out)  # sizes are intact: the cheap checks cannot see it
    assert not np.array_equal(c.read("pooled"), vectors(10)[OK_ROWS])
    assert check_output(out)[0] == 0
    with pytest.raises(DamagedCacheError, match=rf"shard-00001.*pooled checksum mismatch.*{REPAIR}"):
        cache.open(out, verify=True)
    with pytest.raises(DamagedCacheError, match="shard-00001"):
        c.verify(full=True)
    c.verify(full=False)  # structure alone is fine
    code, lines = check_output(out, "--full")
    assert code == 1 and len(lines) == 1 and "checksum" in lines[0]

    assert rerun(out, backend) == set()  # a plain rerun trusts sizes...
    assert rerun(out, backend, verify=True) == {1}  # ...a verifying one rewrites the shard
    assert_sound(out)


def test_shard_of_the_wrong_shape_is_refused_and_repaired(written, tmp_path):
    out, backend = written
    other = tmp_path / "other"
    write_cache(other, backend, meta=make_meta(pooled_dim=8)).close()  # same rows, D=8
    target = shard_path(out, backend)
    _remove(target)
    os.rename(shard_path(other, backend), target)
    with pytest.raises(DamagedCacheError, match=rf"shard-00001.*pooled shape \(4, 3, 8\).*{REPAIR}"):
        cache.open(out)
    assert rerun(out, backend) == {1}
    assert_sound(out)


def test_shard_in_another_shards_place_is_refused(written):
    out, backend = written
    target = shard_path(out, backend, 2)
    _remove(target)
    if backend == "zarr":
        import shutil

        shutil.copytree(shard_path(out, backend, 1), target)
    else:
        target.write_bytes(shard_path(out, backend, 1).read_bytes())
    with pytest.raises(DamagedCacheError, match=r"shard-00002.*says shard 1 rows \[4, 8\], expected shard 2"):
        cache.open(out)
    assert rerun(out, backend) == {2}
    assert_sound(out)


def _other_cache(out, backend, other):
    """A complete cache like ``written`` but of other utterances or with another seed."""
    manifest = make_manifest(10)
    if other == "utterances":
        manifest = [Utterance(u.utt_id.replace("vid", "other"), u.path, u.speaker) for u in manifest]
    meta = make_meta(seed=8) if other == "settings" else make_meta()
    data = vectors(10) + 1.0
    with cache.CacheWriter(out, meta, manifest, backend=backend) as writer:
        for k in range(writer.num_shards):
            rows = writer.shard_rows(k)
            index = [r for r in rows if r not in SKIPPED_ROWS]
            skipped = {manifest[r].utt_id: SKIPPED_ROWS[r] for r in rows if r in SKIPPED_ROWS}
            writer.write_shard(k, index, data[index], skipped, seconds=2.5 * len(rows))
        writer.finish({"utterances_per_second": 12.5})


@pytest.mark.parametrize("other", ["utterances", "settings"])
def test_shard_from_another_cache_is_refused_and_repaired(written, tmp_path, other):
    # Same shard number, rows, shape, no skipped ids, sound checksums: only what it was written for differs.
    out, backend = written
    _other_cache(tmp_path / "other", backend, other)
    target = shard_path(out, backend, 1)
    _remove(target)
    if backend == "zarr":
        import shutil

        shutil.copytree(shard_path(tmp_path / "other", backend, 1), target)
    else:
        target.write_bytes(shard_path(tmp_path / "other", backend, 1).read_bytes())
    with pytest.raises(DamagedCacheError, match=rf"shard-00001.*written for another cache \(other utterances "
                                                rf"or settings\)\); {REPAIR}"):
        cache.open(out)
    assert rerun(out, backend) == {1}
    assert_sound(out)


def test_swapped_manifest_ids_are_detected_and_repaired(written):
    out, backend = written
    manifest = out / "manifest.tsv"
    lines = manifest.read_text().splitlines()
    a, b = lines[1].split("\t"), lines[2].split("\t")
    a[1], b[1] = b[1], a[1]  # rows 0 and 1 trade ids: their vectors would be mislabelled
    lines[1], lines[2] = "\t".join(a), "\t".join(b)
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(DamagedCacheError, match=rf"manifest.tsv: does not match the SHA-256.*{REPAIR}"):
        cache.open(out)
    code, output = check_output(out)
    assert code == 1 and "manifest.tsv" in output[0]
    assert rerun(out, backend) == set()  # the rerun's manifest is the recorded one: rewritten
    assert_sound(out)


def test_manifest_damage_without_the_original_list_is_refused(written):
    out, backend = written
    manifest = out / "manifest.tsv"
    manifest.write_text(manifest.read_text().replace("id00001", "id00002"))
    moved = [Utterance(u.utt_id, "/mnt" + u.path, u.speaker) for u in make_manifest(10)]
    with pytest.raises(DamagedCacheError, match="manifest.tsv: does not match.*--overwrite"):
        cache.CacheWriter(out, make_meta(), moved, backend=backend)


def test_forged_summary_is_reported_and_recomputed(written):
    out, backend = written
    meta = json.loads((out / "cache.json").read_text())
    true = dict(meta["summary"])
    meta["summary"].update(utterances=999, audio_hours=3.0)
    (out / "cache.json").write_text(json.dumps(meta))
    code, lines = check_output(out)
    assert code == 1 and "summary disagrees with the shards (utterances, audio_hours)" in lines[0]
    cache.CacheWriter(out, make_meta(), make_manifest(10), backend=backend).close()  # a rerun
    assert cache.open(out).meta["summary"] == true
    assert check_output(out) == (0, [f"OK {out}: structure and sizes (--full also checks checksums)"])


def test_check_reports_missing_shards_and_bad_paths(tmp_path):
    write_cache(tmp_path / "c", "zarr", shards=[0]).close()
    code, lines = check_output(tmp_path / "c")
    assert code == 1 and lines == [
        f"{tmp_path / 'c'}: 2 of 3 shards missing (first: [1, 2]); rerun the same 'mrlcache extract' "
        f"command to complete it"
    ]
    code, lines = check_output(tmp_path / "nothing")
    assert code == 1 and "no such cache directory" in lines[0]


def test_format_1_cache_without_checksums_still_opens(tmp_path):
    """A cache written before checksums: same structure checks, nothing to verify."""
    out = tmp_path / "c"
    with write_cache(out, "zarr") as writer:
        writer.finish()
    meta = json.loads((out / "cache.json").read_text())
    del meta["summary"]  # its cache_bytes would not count the checksums removed below
    (out / "cache.json").write_text(json.dumps(meta))
    del meta["manifest_sha256"]
    for path in (out / "shards").iterdir():
        group = zarr.open_group(path, mode="r+")
        attrs = dict(group.attrs)
        del attrs["sha256"], attrs["cache"]  # nor their binding to the cache
        group.attrs.clear()
        group.attrs.update(attrs)
    with pytest.raises(DamagedCacheError, match="attributes sha256 missing"):
        cache.open(out)  # still format 2: a shard without checksums is damaged
    (out / "cache.json").write_text(json.dumps({**meta, "format_version": 1}))
    c = cache.open(out, verify=True)
    np.testing.assert_array_equal(c.read("pooled"), vectors(10)[OK_ROWS])
    assert check_output(out, "--full") == (0, [f"OK {out}: structure and sizes (a format-1 cache records no checksums)"])
    delete_index(shard_path(out, "zarr"), "zarr")
    with pytest.raises(DamagedCacheError, match="index chunk"):
        cache.open(out)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_rerunning_extract_repairs_a_damaged_cache(tmp_path, backend):
    """The documented fix, end to end: rerun the same extract command."""
    from conftest import make_tree

    from mrlcache.cli import main

    make_tree(tmp_path / "data", speakers=2, videos=1, utts=3, seconds=1.2)
    out = tmp_path / "c"
    args = ["extract", "--data", str(tmp_path / "data"), "--out", str(out), "--random-init", "--variant", "b0",
            "--views", "2", "--crop-seconds", "1.0", "--dtype", "float32", "--workers", "0", "--quiet",
            "--seed", "3", "--threads", "1", "--shard-size", "2", "--format", backend]
    assert CliRunner().invoke(main, args).exit_code == 0
    expected = cache.open(out).read("pooled")
    summary = cache.open(out).meta["summary"]
    delete_view_chunk(shard_path(out, backend, 1), backend)
    delete_index(shard_path(out, backend, 2), backend)
    assert check_output(out)[0] == 1
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert check_output(out, "--full")[0] == 0
    repaired = cache.open(out, verify=True)
    np.testing.assert_array_equal(repaired.read("pooled"), expected)
    assert repaired.meta["summary"]["utterances"] == summary["utterances"] == 6
