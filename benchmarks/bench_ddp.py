"""Fit throughput on 1 process against N processes under torchrun (gloo on the CPU).

Run by hand (minutes):  python benchmarks/bench_ddp.py [--rows 40000] [--procs 2] [--epochs 2]

A synthetic pooled cache (``--rows`` utterances x 2 views x 512-D float16, 1,000 speakers)
written with the library's writer; then the same fit twice: one process with batch N x B
(``--threads N``) and N processes under ``torchrun --standalone`` with batch B each (one
thread each, as torchrun sets). Both see the same rows per step. Prints samples/s of the
last epoch (history.jsonl) and the wall time of each command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
POOLED = 512


def write_cache(out: Path, rows: int, speakers: int, views: int = 2) -> None:
    from mrlcache import cache
    from mrlcache.corpus import Utterance

    rng = np.random.default_rng(0)
    spk = np.arange(rows) % speakers
    centroids = rng.standard_normal((speakers, POOLED)).astype(np.float32)
    manifest = [Utterance(f"id{s:05d}/v/{i:07d}.wav", f"/none/{i}.wav", f"id{s:05d}") for i, s in enumerate(spk)]
    meta = {"model_config": {"synthetic": True}, "weights_sha256": "0" * 64, "pooled_dim": POOLED,
            "sample_rate": 16000, "mode": "train", "crop_seconds": 2.0, "views": views, "augment": {},
            "seed": 0, "dtype": "float16", "shard_size": 4096}
    with cache.CacheWriter(out, meta, manifest) as writer:
        for k in range(writer.num_shards):
            idx = list(writer.shard_rows(k))
            x = centroids[spk[idx]][:, None] + rng.standard_normal((len(idx), views, POOLED)).astype(np.float32)
            writer.write_shard(k, idx, x.astype(np.float16), {}, seconds=0.0)
        writer.finish()


def run(cmd, env) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=40000)
    p.add_argument("--speakers", type=int, default=1000)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="per process")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cache(tmp / "cache", args.rows, args.speakers)
        common = ["fit", "--cache", str(tmp / "cache"), "--dims", "64,128,192,256", "--epochs", str(args.epochs),
                  "--val-speakers", "0", "--head-only", "--quiet"]
        n = args.procs
        rows = []
        for label, cmd, e in [
            (f"1 process x batch {n * args.batch} ({n} threads)",
             [sys.executable, "-m", "mrlcache", *common, "--out", str(tmp / "one"),
              "--batch-size", str(n * args.batch), "--threads", str(n)], env),
            (f"{n} processes x batch {args.batch} (1 thread each, gloo)",
             [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
              "-m", "mrlcache", *common, "--out", str(tmp / "many"), "--batch-size", str(args.batch)],
             {**env, "OMP_NUM_THREADS": "1"}),
        ]:
            wall = run(cmd, e)
            out = tmp / ("one" if label.startswith("1 ") else "many")
            hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
            rows.append((label, hist[-1]["samples_per_s"], hist[-1]["seconds"], wall))
        print(f"rows {args.rows}, speakers {args.speakers}, epochs {args.epochs}, load {os.getloadavg()[0]:.1f}")
        print("| run | samples/s (last epoch) | epoch s | command wall s |\n|---|---|---|---|")
        for label, sps, sec, wall in rows:
            print(f"| {label} | {sps:,.0f} | {sec:.1f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
