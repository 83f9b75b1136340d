"""The trial vectors of a cache read in its own dtype, shard by shard, and scored batch by batch
(``CacheRows``, ``evaluate.batched``): the same vectors, embeddings and metrics as reading
the whole cache in float32 and projecting it at once."""

import numpy as np
import pytest
import torch

from mrlcache import cache as cache_mod
from mrlcache import evaluate as ev
from mrlcache import metrics, scoring
from mrlcache.interop import import_vectors
from mrlcache.models.adaptor import WarmHead
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import load_model, save_model
from mrlcache.trials import read_trials

SPEAKERS, PER_SPEAKER, DIM = 12, 25, 40  # 300 vectors in shards of 64 (the last one short)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A float16 cache of imported vectors, a head-only model, and a trial list over part of the cache."""
    root = tmp_path_factory.mktemp("batched")
    rng = np.random.default_rng(3)
    n = SPEAKERS * PER_SPEAKER
    spk = np.arange(n) // PER_SPEAKER
    ids = [f"id{10000 + s}/v{i % 3}/{i:05d}.wav" for i, s in enumerate(spk)]
    vectors = rng.standard_normal((SPEAKERS, DIM))[spk] + 0.7 * rng.standard_normal((n, DIM))
    np.save(root / "v.npy", vectors.astype(np.float32))
    (root / "v.ids").write_text("\n".join(ids) + "\n")
    import_vectors(root / "v.npy", root / "cache", ids_file=root / "v.ids", shard_size=64)
    torch.manual_seed(0)
    save_model(root / "model.pt", MatryoshkaHead(DIM, [8, 16]).eval())
    # Trials over every utterance but those of shard 2, in an order unlike the cache's.
    used = [i for i in rng.permutation(n) if not 128 <= i < 192]
    pairs = rng.choice(used, size=(900, 2))
    (root / "trials.txt").write_text("".join(f"{int(spk[a] == spk[b])} {ids[a]} {ids[b]}\n" for a, b in pairs))
    return root


def test_batch_bounds_are_equal_and_large():
    assert ev.batch_bounds(5, 8).tolist() == [0, 5]  # at most one batch: the whole matrix
    for n, batch in [(9, 8), (145_000, 2048), (2049, 2048), (300, 7)]:
        bounds = ev.batch_bounds(n, batch)
        sizes = np.diff(bounds)
        assert bounds[0] == 0 and bounds[-1] == n
        assert sizes.max() <= batch and sizes.min() >= batch // 2 and sizes.max() - sizes.min() <= 1


def test_cache_rows_are_the_trial_rows_in_the_stored_dtype(imported):
    cache = cache_mod.open(imported / "cache")
    trials = read_trials(imported / "trials.txt")
    v = ev.pooled_from_cache(cache, trials)
    assert isinstance(v.pooled, ev.CacheRows) and v.pooled.dtype == np.float16
    want = cache.read("pooled", dtype=np.float32).reshape(len(cache), -1)[cache.index_of(v.utterances)]  # (U, P)
    assert v.pooled.shape == want.shape and len(v.pooled) == len(want)
    # Every way of reading them gives the old float32 path's values once widened.
    np.testing.assert_array_equal(np.asarray(v.pooled).astype(np.float32), want)
    np.testing.assert_array_equal(np.asarray(v.pooled, dtype=np.float32), want)
    np.testing.assert_array_equal(v.pooled[3], want[3])
    np.testing.assert_array_equal(v.pooled[10:20], want[10:20])
    # Batch by batch: each row once, from the shards that hold it (shard 2 is not needed).
    seen = np.zeros(len(want), dtype=int)
    for batch in (7, 64, 100, 10_000):
        seen[:] = 0
        for where, x in v.pooled.batches(batch):
            assert x.dtype == np.float16 and len(x) <= batch
            np.testing.assert_array_equal(x.astype(np.float32), want[where])
            seen[where] += 1
        assert (seen == 1).all()


@pytest.mark.parametrize("head", ["matryoshka", "warm"])
def test_batched_embeddings_equal_the_whole_matrix(imported, head):
    rng = np.random.default_rng(5)
    torch.manual_seed(1)
    net = MatryoshkaHead(DIM, [8, 16]) if head == "matryoshka" else WarmHead(DIM, [8, 16], embed_dim=16)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
        for b in net.buffers():
            if b.dtype.is_floating_point:
                b.copy_(torch.rand_like(b) + 0.5)
    model = load_model(save_model(imported / f"{head}.pt", net.eval()))
    x = rng.standard_normal((5000, DIM)).astype(np.float16)
    whole = model.project(x.astype(np.float32))
    for batch in (64, 1000, 2048, 8192):
        np.testing.assert_array_equal(ev.batched(model.project, x, batch), whole)
    v = ev.pooled_from_cache(cache_mod.open(imported / "cache"), read_trials(imported / "trials.txt"))
    np.testing.assert_array_equal(ev.batched(model.project, v.pooled, 64),
                                  model.project(np.asarray(v.pooled, dtype=np.float32)))


def test_evaluate_on_cache_rows_equals_the_float32_path(imported):
    """The metrics of every system from CacheRows in batches are those of the whole float32 matrix."""
    model = load_model(imported / "model.pt")
    cache = cache_mod.open(imported / "cache")
    v = ev.pooled_from_cache(cache, read_trials(imported / "trials.txt"))
    systems = ev.transforms(model, ["mrl", "raw"])
    got = ev.evaluate(v.trials, v.utterances, v.pooled, systems, [8, 16])
    want = ev.evaluate(v.trials, v.utterances, np.asarray(v.pooled, dtype=np.float32), systems, [8, 16])
    assert got == want
    # And the metrics by hand: one sort gives what the separate functions give.
    emb = model.project(np.asarray(v.pooled, dtype=np.float32))
    ie, it = v.trials.indices({u: i for i, u in enumerate(v.utterances)})
    for row, result in zip(scoring.score_trials(emb, ie, it, [8, 16]), got):
        assert (result["eer"], result["threshold"]) == metrics.eer(row, v.trials.labels)
        assert result["min_dcf_0.01"] == metrics.min_dcf(row, v.trials.labels, p_target=0.01)
        assert result["min_dcf_0.05"] == metrics.min_dcf(row, v.trials.labels, p_target=0.05)


def test_eer_min_dcf_is_the_separate_metrics():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 5000)
    scores = np.round(rng.standard_normal(5000) + labels, 2)  # ties included
    value, threshold, dcfs = metrics.eer_min_dcf(scores, labels, (0.01, 0.05, 0.5))
    assert (value, threshold) == metrics.eer(scores, labels)
    assert dcfs == [metrics.min_dcf(scores, labels, p_target=p) for p in (0.01, 0.05, 0.5)]
    with pytest.raises(metrics.MetricsError, match="p_target"):
        metrics.eer_min_dcf(scores, labels, (0.0,))


def test_score_trials_without_mean_skips_the_float64_copy_exactly():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((3000, 24)).astype(np.float32)
    ie, it = rng.integers(0, 3000, 10_000), rng.integers(0, 3000, 10_000)
    fast = scoring.score_trials(emb, ie, it, [4, 24, 9])
    # A zero mean takes the float64 path (centred, then back to float32): the same numbers.
    np.testing.assert_array_equal(fast, scoring.score_trials(emb, ie, it, [4, 24, 9], mean=np.zeros(24)))
    np.testing.assert_array_equal(scoring.score_trials(emb.astype(np.float16), ie, it, [4, 24]),
                                  scoring.score_trials(emb.astype(np.float16).astype(np.float64), ie, it, [4, 24]))
