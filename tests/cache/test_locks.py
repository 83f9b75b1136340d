"""Rank locks: one live writer per rank, another rank side by side, a live rank's temporary
shard kept, and a lock that a forked child of a killed writer does not hold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
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


FORK_AND_HOLD = textwrap.dedent(
    """
    import os, sys, time
    import mrlcache.cache as cache
    from cache_builders import make_manifest, make_meta
    writer = cache.CacheWriter(sys.argv[1], make_meta(), make_manifest(10), rank=0)
    child = os.fork()  # what a DataLoader worker is
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    sys.stdin.read()
    """
)


def test_killed_writers_forked_child_does_not_keep_the_lock(tmp_path):
    out = tmp_path / "c"
    parent = subprocess.Popen(
        [sys.executable, "-c", FORK_AND_HOLD, str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent,
    )
    child = int(parent.stdout.readline())
    try:
        with pytest.raises(cache.CacheLockedError, match="rank 0"):
            cache.CacheWriter(out, make_meta(), make_manifest(10), rank=0)
        parent.send_signal(signal.SIGKILL)  # kill -9 of extract; its worker lives on
        parent.wait()
        os.kill(child, 0)  # raises if the child is gone: it must still be alive here
        started = time.monotonic()
        writer = cache.CacheWriter(out, make_meta(), make_manifest(10), rank=0)  # no retry, no wait
        assert time.monotonic() - started < 5
        os.kill(child, 0)
        writer.close()
    finally:
        parent.kill()
        parent.wait()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


TRY_RANK_1 = textwrap.dedent(
    """
    import sys
    import mrlcache.cache as cache
    from cache_builders import make_manifest, make_meta
    try:
        cache.CacheWriter(sys.argv[1], make_meta(), make_manifest(10), rank=1).close()
        print("free")
    except cache.CacheLockedError:
        print("locked")
    """
)


def test_probing_a_lock_in_the_same_process_keeps_it(tmp_path):
    """POSIX locks are dropped when the process closes any descriptor of the file: probing
    rank 1's lock from rank 0's writer in the same process must not release it."""
    out = tmp_path / "c"
    rank1 = cache.CacheWriter(out, make_meta(), make_manifest(10), rank=1)
    with pytest.raises(cache.CacheLockedError, match="rank 1"):
        cache.CacheWriter(out, make_meta(), make_manifest(10), rank=1)  # same process, same rank
    (out / "shards" / ".shard-00001.tmp-r1-12345").mkdir()
    cache.CacheWriter(out, make_meta(), make_manifest(10), rank=0).close()  # probes rank 1's lock
    with pytest.raises(cache.CacheLockedError, match="cannot overwrite"):
        cache.CacheWriter(out, make_meta(), make_manifest(10), rank=0, overwrite=True)
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", TRY_RANK_1, str(out)], capture_output=True, text=True,
        cwd=Path(__file__).parent, check=True,
    ).stdout.strip()
    assert run() == "locked"
    rank1.close()
    assert run() == "free"
