"""The reader's errors and lookups."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mrlcache.cache as cache
from cache_builders import OK_ROWS, make_manifest, vectors, write_cache


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
