"""Rank locks: one live writer per rank, another rank side by side, a live rank's temporary
shard kept, and a lock that a forked child of a killed writer does not hold."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mrlcache.cache as cache
from cache_builders import make_manifest, make_meta, vectors


HOLD_LOCK = textwrap.dedent(
    """
    import sys
    import mrlcache.cache as cache
    from cache_builders import make_manifest, make_meta
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
