"""Eval mode's buckets: utterances of exactly equal length in one forward, nothing padded.

Each row of a batch must be what the utterance gives alone (within float rounding: 1e-5
relative), for ReDimNet and for ECAPA-TDNN and CAM++ on their real weights, whose
per-utterance statistics (sentence mean normalisation, global-context pooling) must not mix
the rows; and the cache must keep its row order, ids and determinism.
"""

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tree, speech_like

import mrlcache.cache
from mrlcache.backbone.loading import load_backbone
from mrlcache.cli import main
from mrlcache.extract.buckets import EvalBuckets
from mrlcache.extract.config import ExtractConfig
from mrlcache.streams.batch import forward_streams

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "encoders"
TOL = 1e-5
COMMON = ["--mode", "eval", "--random-init", "--variant", "b0", "--workers", "0", "--quiet", "--seed", "3",
          "--threads", "1"]


def item(row, samples, seed=0):
    return SimpleNamespace(row=row, views=speech_like(samples / 16000, seed=seed)[None], seconds=samples / 16000)


def rel(a, b):
    """Largest per-row relative error ||a - b|| / ||b||."""
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def test_buckets_group_equal_lengths_up_to_the_batch_and_the_window():
    buckets = EvalBuckets(batch_size=3, window_seconds=1.0)  # a batch holds at most 16000 samples
    lengths = [4000, 5000, 4000, 4000, 4000, 20000, 5000, 8000, 8000, 8000]
    ready = buckets.add(0, [SimpleNamespace(row=r, views=np.zeros((1, n))) for r, n in enumerate(lengths)])
    # 4000 x3 is full at the batch size; 20000 is longer than the window: alone; 8000 x2 fills 16000 samples.
    assert [[it.row for it in batch] for batch in ready] == [[0, 2, 3], [5], [7, 8]]
    rest = buckets.finish(0)
    assert [[it.row for it in batch] for batch in rest] == [[1, 6], [4], [9]]  # oldest bucket first
    assert buckets.held == 0 and not buckets.open


def test_buckets_run_the_oldest_when_too_much_audio_waits_and_single_is_one_each():
    buckets = EvalBuckets(batch_size=8, window_seconds=None, hold_seconds=1.0)
    ready = buckets.add(0, [SimpleNamespace(row=r, views=np.zeros((1, n))) for r, n in enumerate([6000, 7000, 6000])])
    assert [[it.row for it in batch] for batch in ready] == [[0, 2]]  # 19000 samples held > 16000: oldest out
    assert [[it.row for it in b] for b in buckets.finish(0)] == [[1]]
    single = EvalBuckets(batch_size=1, window_seconds=None)
    out = single.add(4, [SimpleNamespace(row=r, views=np.zeros((1, 5000))) for r in range(3)])
    assert [[it.row for it in batch] for batch in out] == [[0], [1], [2]] and single.finish(4) == []


def _batched_equals_alone(model, streams="pooled"):
    cfg = ExtractConfig.of(mode="eval", streams=streams, device="cpu", precision="fp32")
    # Two utterances of equal length and different content (other voice, other seed), and a third.
    group = [item(0, 24000, seed=1), item(1, 24000, seed=2), item(2, 24000, seed=3)]
    group[1].views = (0.3 * group[1].views[:, ::-1] + 0.2 * speech_like(1.5, seed=9, f0=210.0)[None]).copy()
    seconds = dict.fromkeys(cfg.stream_names, 0.0)
    with torch.inference_mode():
        batched = forward_streams(model, None, group, torch.device("cpu"), "fp32", cfg, seconds)
        alone = [forward_streams(model, None, [it], torch.device("cpu"), "fp32", cfg, seconds) for it in group]
    for name, value in batched.items():
        for i in range(len(group)):
            got, want = value[i], alone[i][name][0]
            got, want = np.asarray(got), np.asarray(want)
            assert got.shape == want.shape and np.array_equal(np.isnan(got), np.isnan(want)), name  # f0: unvoiced
            assert rel(np.nan_to_num(got)[None], np.nan_to_num(want)[None]) < TOL, (name, i)
    pooled = batched["pooled"][:, 0]
    assert rel(pooled[:1], pooled[1:2]) > 1e-2  # the equal-length rows really differ: no mixing hides
    return batched


def test_redimnet_rows_of_a_batch_equal_each_utterance_alone_in_every_stream():
    torch.manual_seed(0)
    model = load_backbone("b0", random_init=True, seed=0).eval()
    _batched_equals_alone(model, "pooled,layers,fbank,mfcc,f0")


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="needs ../shared/fixtures/encoders")
@pytest.mark.parametrize("source", ["ecapa-voxceleb", "campplus-zh-en/campplus_cn_en_common.pt"])
def test_ecapa_and_campplus_rows_do_not_mix_their_per_utterance_statistics(source):
    model = load_backbone(str(FIXTURES / source)).eval()
    batched = _batched_equals_alone(model, "pooled,layers")
    # The per-utterance front end: each row's mean over time is removed from that row alone.
    group = torch.from_numpy(np.concatenate([item(0, 24000, seed=1).views, 0.1 * item(1, 24000, seed=2).views]))
    with torch.inference_mode():
        together = model.features(group)
        alone = torch.cat([model.features(group[i : i + 1]) for i in range(2)])
    assert rel(together.numpy(), alone.numpy()) < TOL
    assert batched["pooled"].shape[:2] == (3, 1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Equal lengths (1.3 s at 16 and 8 kHz decode to 20800 samples) beside other lengths."""
    root = tmp_path_factory.mktemp("equal")
    make_tree(root, speakers=3, videos=2, utts=2, seconds=1.3, rates=(16000, 8000))
    make_tree(root / "other", speakers=2, videos=1, utts=2, seconds=1.7)
    make_tree(root / "odd", speakers=1, videos=1, utts=1, seconds=1.45)
    return root


def extract(corpus, out, *args):
    result = CliRunner().invoke(main, ["extract", "--data", str(corpus), "--out", str(out), *COMMON, *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return mrlcache.cache.open(out, allow_incomplete=True)


def _shard_bytes(cache_dir):
    return {p.relative_to(cache_dir).as_posix(): p.read_bytes()
            for p in sorted((Path(cache_dir) / "shards").rglob("*")) if p.is_file()}


def test_bucketed_cache_equals_one_per_forward_in_order_and_is_deterministic(corpus, tmp_path):
    single = extract(corpus, tmp_path / "single", "--eval-batch", "single", "--dtype", "float32", "--shard-size", "7")
    bucket = extract(corpus, tmp_path / "bucket", "--eval-batch", "bucket", "--dtype", "float32", "--shard-size", "7")
    assert bucket.utterances == single.utterances
    assert rel(bucket.read("pooled", view=0), single.read("pooled", view=0)) < TOL
    # float16: each stored value within one float16 step of one per forward's.
    half = [extract(corpus, tmp_path / f"{m}16", "--eval-batch", m, "--shard-size", "7") for m in ("single", "bucket")]
    a, b = (c.read("pooled", view=0).astype(np.float32) for c in half)
    step = np.spacing(np.abs(a).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(a - b) <= step)
    # The same command twice: the same bytes.
    again = tmp_path / "again"
    extract(corpus, again, "--eval-batch", "bucket", "--dtype", "float32", "--shard-size", "7")
    assert _shard_bytes(again) == _shard_bytes(tmp_path / "bucket")


def test_bucketed_ranks_and_a_resumed_run_equal_one_run(corpus, tmp_path):
    args = ["--eval-batch", "bucket", "--dtype", "float32", "--shard-size", "5", "--batch-size", "4"]
    one = extract(corpus, tmp_path / "one", *args)
    for rank in (1, 0):
        extract(corpus, tmp_path / "two", *args, "--rank", str(rank), "--world-size", "2")
    assert _shard_bytes(tmp_path / "two") == _shard_bytes(tmp_path / "one")
    shutil.rmtree(next((tmp_path / "two" / "shards").glob("shard-00001*")))  # a zarr directory
    resumed = extract(corpus, tmp_path / "two", *args)
    np.testing.assert_array_equal(resumed.read("pooled"), one.read("pooled"))
    assert _shard_bytes(tmp_path / "two") == _shard_bytes(tmp_path / "one")
