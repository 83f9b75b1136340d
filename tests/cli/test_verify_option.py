"""``--verify`` on the commands that read caches: flipped bytes are refused before any work.

Without ``--verify`` opening a cache checks its structure and sizes only (cheap, always);
with it every array's SHA-256 is recomputed, so a flipped byte that keeps every size is
caught and named.
"""

import pytest
from click.testing import CliRunner

import mrlcache.cache as cache_mod
from mrlcache.cli import main


def build(tmp_path):
    """A zarr cache of 8 utterances x 2 views x 6 dims in two shards, one byte flipped in shard 1."""
    import numpy as np

    from mrlcache.corpus import Utterance

    ids = [f"id{i % 4:05d}/v/{i:05d}.wav" for i in range(8)]
    manifest = [Utterance(u, "/data/" + u, u.split("/")[0]) for u in ids]
    meta = {"pooled_dim": 6, "views": 2, "dtype": "float32", "shard_size": 4, "mode": "imported"}
    x = np.random.default_rng(0).standard_normal((8, 2, 6)).astype(np.float32)
    with cache_mod.CacheWriter(tmp_path / "c", meta, manifest) as writer:
        for k in range(writer.num_shards):
            rows = writer.shard_rows(k)
            writer.write_shard(k, np.arange(rows.start, rows.stop), x[rows.start:rows.stop], {}, 1.0)
        writer.finish()
    chunk = tmp_path / "c" / "shards" / "shard-00001.zarr" / "pooled" / "c" / "0" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x40
    chunk.write_bytes(bytes(data))
    return tmp_path / "c"


@pytest.mark.parametrize("command", [
    ["export-vectors", "{cache}", "--format", "npz", "--out", "{tmp}/v.npz"],
    ["fit", "--cache", "{cache}", "--dims", "2,4", "--out", "{tmp}/run", "--epochs", "1", "--batch-size", "4",
     "--val-speakers", "0", "--quiet"],
])
def test_verify_refuses_flipped_bytes_that_a_plain_open_accepts(tmp_path, command):
    cache = build(tmp_path)
    args = [a.format(cache=cache, tmp=tmp_path) for a in command]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output  # sizes and structure are intact
    args = [a.format(cache=cache, tmp=tmp_path / "again") for a in command]
    (tmp_path / "again").mkdir()
    checked = CliRunner().invoke(main, [*args[:1], "--verify", *args[1:]])
    assert checked.exit_code != 0 and "Traceback" not in checked.output
    assert "shard-00001" in checked.output and "rerun" in checked.output
    # The setting lasts for that command only.
    assert cache_mod.open(cache).path == cache
