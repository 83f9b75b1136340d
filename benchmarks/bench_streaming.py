"""Streamed against in-memory fits, pooled and one frame stream, and OpenMP's wait policy (by hand).

Writes synthetic caches with the library's writer (VoxCeleb2 geometry scaled down to the
disk and the time at hand: pooled (rows, 6 views, 2304) float16 over 5,994 speakers; an
fbank-like frame stream (80, 200) float16), then runs one-epoch fits in subprocesses,
interleaved and repeated: ``--memory-gb 64`` (in memory) against ``--memory-gb 0.5``
(streamed, the window the budget allows), each under ``OMP_WAIT_POLICY=PASSIVE`` and
OpenMP's default. Reports samples/s (history.jsonl), the epoch's seconds and the
subprocess's peak RSS, and projects one streamed epoch to VoxCeleb2 (1,092,009 utterances)
and to 30 epochs.

    python benchmarks/bench_streaming.py --out /tmp/bench-streaming --rows 36000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VOX2 = 1_092_009
RUN = """
import json, sys, time
from mrlcache.fit import fit
opts = json.loads(sys.argv[1])
t = time.perf_counter()
run = fit(sys.argv[2], (64, 128, 192, 256), sys.argv[3], **opts)
h = [json.loads(x) for x in open(run + "/history.jsonl" if isinstance(run, str) else run / "history.jsonl")]
s = json.loads(open(str(run) + "/summary.json").read())
print(json.dumps({"samples_per_s": h[-1]["samples_per_s"], "seconds": h[-1]["seconds"],
                  "features": s["features"], "memory": s["memory"], "wall": time.perf_counter() - t}))
"""


def write_pooled(out: Path, rows: int, speakers: int, views: int = 6, dim: int = 2304) -> None:
    from mrlcache import cache
    from mrlcache.corpus import Utterance

    if (out / "cache.json").exists():
        return
    rng = np.random.default_rng(0)
    spk = np.arange(rows) % speakers
    centres = rng.standard_normal((speakers, dim), dtype=np.float32)
    manifest = [Utterance(f"id{s:05d}/v/{i:07d}.wav", f"/none/{i}.wav", f"id{s:05d}") for i, s in enumerate(spk)]
    meta = {"model_config": {"synthetic": True}, "weights_sha256": "0" * 64, "pooled_dim": dim, "sample_rate": 16000,
            "mode": "train", "crop_seconds": 2.0, "views": views, "augment": {}, "seed": 0, "dtype": "float16",
            "shard_size": 1000}
    with cache.CacheWriter(out, meta, manifest) as writer:
        for k in range(writer.num_shards):
            r = np.array(writer.shard_rows(k))
            x = centres[spk[r]][:, None] + rng.standard_normal((len(r), views, dim), dtype=np.float32)
            writer.write_shard(k, r, x, {}, seconds=0.0)
        writer.finish()


def write_frames(out: Path, rows: int, speakers: int, views: int = 2, bins: int = 80, frames: int = 200) -> None:
    from mrlcache import cache
    from mrlcache.corpus import Utterance
    from mrlcache.streams import StreamRecord

    if (out / "cache.json").exists():
        return
    rng = np.random.default_rng(1)
    spk = np.arange(rows) % speakers
    centres = rng.standard_normal((speakers, bins, 1), dtype=np.float32)
    manifest = [Utterance(f"id{s:05d}/v/{i:07d}.wav", f"/none/{i}.wav", f"id{s:05d}") for i, s in enumerate(spk)]
    record = StreamRecord("fbank", "frames", (bins,), "float16", 100.0, False, frames)
    meta = {"model_config": None, "pooled_dim": 0, "sample_rate": 16000, "mode": "train", "crop_seconds": 2.0,
            "views": views, "augment": {}, "seed": 0, "dtype": "float16", "shard_size": 500,
            "streams": {"fbank": record.to_json()}}
    with cache.CacheWriter(out, meta, manifest) as writer:
        for k in range(writer.num_shards):
            r = np.array(writer.shard_rows(k))
            x = centres[spk[r]][:, None] + rng.standard_normal((len(r), views, bins, frames), dtype=np.float32)
            writer.write_shard(k, r, None, {}, 0.0, streams={"fbank": x})
        writer.finish()


def one(cache: Path, run: Path, opts: dict, wait: str | None) -> dict:
    """One fit in a subprocess: its numbers and its own peak RSS (wait4's rusage)."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if wait:
        env["OMP_WAIT_POLICY"] = wait
    with open(str(run) + ".stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", RUN, json.dumps(opts), str(cache), str(run)],
                                stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(Path(str(run) + ".stderr").read_text()[-3000:])
    got = json.loads(out.strip().splitlines()[-1])
    got["peak_rss_gb"] = usage.ru_maxrss / 2**20
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=36_000)
    ap.add_argument("--frame-rows", type=int, default=8_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--waits", default="PASSIVE,default")
    ap.add_argument("--only", default="pooled,fbank")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    write_pooled(args.out / "pooled", args.rows, 5994)
    write_frames(args.out / "fbank", args.frame_rows, 500)
    print(f"caches ready in {time.perf_counter() - tick:.0f} s", flush=True)
    base = dict(epochs=1, batch_size=256, head_only=True, progress=False, val_speakers=0, warmup_epochs=0,
                margin_warmup_epochs=0)
    kinds = {"pooled": dict(base), "fbank": dict(base, inputs="fbank", encoder_dim=128)}
    rows = []
    for rep in range(args.repeats):
        for kind in args.only.split(","):
            for wait in args.waits.split(","):
                for budget in (64.0, 0.5):  # interleaved: memory, streamed, memory, streamed...
                    run = args.out / f"run-{kind}-{wait}-{budget}-{rep}"
                    shutil.rmtree(run, ignore_errors=True)
                    got = one(args.out / kind, run, dict(kinds[kind], memory_gb=budget),
                              None if wait == "default" else wait)
                    got.update(kind=kind, wait=wait, budget=budget, repeat=rep)
                    rows.append(got)
                    print(json.dumps(got), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
