"""The fit's memory plan against the peak RSS a fit really reaches (a subprocess's VmHWM).

The cache is large enough (about 160 MB of float16 vectors) for what the fit holds to stand
out from the interpreter's own memory. The plan (mrlcache.fit.memory) counts the whole
process: its RSS when it plans, the features, the float32 batches, the model's gradients,
optimiser state and one batch's saved activations, the raw-cosine baseline's scoring
block, and what a fresh process takes on first use (FIRST_USE: torch's and oneDNN's
buffers, the TensorBoard writer, matplotlib's figure, torch.save's). Two checks: a warm
process (a tiny fit first, so first-use buffers are held already) grows by what the plan
says the fit holds; a fresh process, as the command line runs, peaks within the budget when
streamed in several passes, and at the estimate in memory.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mrlcache.cache as cache
from mrlcache.fit.memory import FIRST_USE, ROW_INDEX_BYTES
from mrlcache.corpus import Utterance

ROWS, VIEWS, DIM, SPEAKERS = 40_000, 2, 1024, 400


def write_cache(out, n: int, speakers: int):
    rng = np.random.default_rng(0)
    spk = np.arange(n) % speakers
    centres = rng.standard_normal((speakers, DIM)).astype(np.float32)
    manifest = [Utterance(f"id{s:05d}/v/{i:06d}.wav", f"/none/{i}.wav", f"id{s:05d}") for i, s in enumerate(spk)]
    meta = {"model_config": {"synthetic": True}, "weights_sha256": "0" * 64, "pooled_dim": DIM, "sample_rate": 16000,
            "mode": "train", "crop_seconds": 2.0, "views": VIEWS, "augment": {}, "seed": 0, "dtype": "float16",
            "shard_size": 2000}
    with cache.CacheWriter(out, meta, manifest) as writer:
        for k in range(writer.num_shards):
            rows = np.array(writer.shard_rows(k))
            x = centres[spk[rows]][:, None] + rng.standard_normal((len(rows), VIEWS, DIM), dtype=np.float32)
            writer.write_shard(k, rows, x, {}, seconds=0.0)
        writer.finish()
    return out


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("mem") / "cache", ROWS, SPEAKERS)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("tiny") / "cache", 800, 40)


SCRIPT = textwrap.dedent("""
    import json, sys

    def peak():  # this process's own high-water RSS: VmHWM is per address space, so unlike
        # ru_maxrss it does not start at the size of the (large) pytest process that forked it
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    import matplotlib
    matplotlib.use("Agg")
    from mrlcache import cache
    from mrlcache.fit import fit
    opts = dict(epochs=1, batch_size=256, head_only=True, progress=False, val_speakers=4,
                memory_gb=float(sys.argv[3]), warmup_epochs=0, margin_warmup_epochs=0)
    if sys.argv[4] != "fresh":  # what the process holds once, whatever the cache
        fit(sys.argv[4], (32, 64), sys.argv[2] + "-warm", **opts)
    c = cache.open(sys.argv[1])
    before = peak()
    run = fit(c, (32, 64), sys.argv[2], **opts)
    after = peak()
    summary = json.loads((run / "summary.json").read_text())
    loss = [json.loads(x)["loss"] for x in (run / "history.jsonl").read_text().splitlines()]
    print(json.dumps({"grown": after - before, "peak": after, "memory": summary["memory"], "loss": loss}))
""")


def run_fit(cache_dir, run, memory_gb: float, warm="fresh"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir), str(run), repr(memory_gb), str(warm)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_memory_estimate_matches_the_measured_peak(big_cache, tiny_cache, tmp_path):
    got, _ = run_fit(big_cache, tmp_path / "run", 4.0, tiny_cache)
    memory, grown = got["memory"], got["grown"]
    assert memory["policy"] == "memory"
    assert memory["features_bytes"] == ROWS * VIEWS * DIM * 2  # float16, every view of every row
    held = memory["features_bytes"] + memory["batches_bytes"] + memory["model_bytes"]
    # The warm-up fit already holds the first-use buffers; the scoring block is in "other".
    estimate = held + memory["other_bytes"] - FIRST_USE
    print(f"grew {grown / 1e6:.0f} MB, estimate {estimate / 1e6:.0f} MB ({memory})")
    # What the fit grew by is at least most of what it holds (the features are really held)
    # and at most the estimate and 128 MB of transients and slack (measured: 248-280 MB for
    # 171 + 50 in memory).
    assert 0.7 * held <= grown <= 1.2 * estimate + 128e6, (grown, memory)


ALLOWANCE = 32 * 2**20  # the allocator's slack beyond the estimate (measured within 10 MB of it)


def test_a_streamed_fit_in_several_passes_stays_within_its_budget(big_cache, tmp_path):
    """A fresh process, as 'mrlcache fit' is: in memory its peak RSS is the plan's estimate;
    with a budget that holds a quarter of the training rows per read (about 4 passes over
    the cache each epoch) its peak stays under the budget, and its losses are the fit's in memory."""
    whole, _ = run_fit(big_cache, tmp_path / "memory", 8.0)
    memory = whole["memory"]
    assert memory["policy"] == "memory" and whole["peak"] <= memory["estimate_bytes"] + ALLOWANCE, whole
    fixed = memory["estimate_bytes"] - memory["features_bytes"]  # the process, model, batches, first use
    read = 2 * 2000 * DIM * 2  # one view of a shard (2,000 rows) read whole, and the rows taken from it
    budget = fixed + read + 2 * (DIM * 2 + ROW_INDEX_BYTES) * (ROWS // 4)
    streamed, err = run_fit(big_cache, tmp_path / "streamed", budget / 2**30)
    plan = streamed["memory"]
    print(f"budget {budget / 1e6:.0f} MB: peak {streamed['peak'] / 1e6:.0f} MB, in memory {whole['peak'] / 1e6:.0f} "
          f"MB ({plan})")
    assert plan["policy"] == "streamed" and 3 <= plan["passes_per_epoch"] <= 8, plan
    assert plan["estimate_bytes"] <= plan["budget_bytes"] and "below what this fit needs" not in err
    assert streamed["peak"] <= plan["budget_bytes"] + ALLOWANCE, (streamed["peak"], plan)
    assert streamed["loss"] == whole["loss"]  # the same fit, whatever the budget
