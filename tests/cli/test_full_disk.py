"""A disk that fills up in the middle of an extract: one line, an incomplete cache, a rerun that finishes.

The failure is simulated (ENOSPC from the shard backend on the second shard) because CI
cannot mount a small filesystem; the shard writer sees exactly what a full disk gives it.
"""

import errno

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_tree

import mrlcache.cache as cache_mod
from mrlcache.cache import IncompleteCacheError
from mrlcache.cli import main

pytestmark = pytest.mark.slow


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_enospc_mid_extract_is_one_line_and_a_rerun_completes_the_cache(tmp_path, monkeypatch):
    make_tree(tmp_path / "data", speakers=3, videos=1, utts=2, seconds=0.6)
    args = ["extract", "--data", tmp_path / "data", "--random-init", "--variant", "b0", "--views", "2",
            "--crop-seconds", "0.5", "--shard-size", "2", "--threads", "1", "--workers", "0", "--quiet"]
    backend = cache_mod.BACKENDS["zarr"]
    real_write, calls = backend.write, []

    def write(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, *a, **k)

    monkeypatch.setattr(backend, "write", staticmethod(write))
    result = run(*args, "--out", tmp_path / "c")
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "free some space" in errors[0]
    # Nothing that looks complete: the cache refuses to open, and no temporary shard is left.
    with pytest.raises(IncompleteCacheError):
        cache_mod.open(tmp_path / "c")
    assert not [p for p in (tmp_path / "c" / "shards").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(backend, "write", staticmethod(real_write))
    assert run(*args, "--out", tmp_path / "c").exit_code == 0  # the documented fix: rerun the command
    assert run(*args, "--out", tmp_path / "clean").exit_code == 0
    resumed, clean = cache_mod.open(tmp_path / "c", verify=True), cache_mod.open(tmp_path / "clean")
    assert resumed.utterances == clean.utterances
    np.testing.assert_array_equal(resumed.read("pooled"), clean.read("pooled"))
