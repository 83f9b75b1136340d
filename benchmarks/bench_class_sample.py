"""Accuracy of a sampled-class softmax (``fit --class-sample``) against the full softmax.

Run by hand (minutes):  python benchmarks/bench_class_sample.py [--speakers 5994] [--rates 1,0.5,0.25]

A synthetic cache with VoxCeleb2's speaker count: each speaker is a centroid in a
``--rank``-dim subspace of a 512-dim pooled space; each utterance adds a session offset in
the same subspace (which no linear map can remove), a strong nuisance in another subspace
and a common offset (which a head can remove), and each view adds noise. One fit per rate
with the same seed and everything else equal; every fit is scored on the same trials of
unseen speakers. Prints EER per dim, the mean, samples/s and the step time per rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

POOLED = 512


def vectors(n_spk: int, utts: int, views: int, rank: int, session: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, V, POOLED) float32 pooled vectors and (N,) speaker index; the geometry is fixed."""
    rng = np.random.default_rng(1234)  # the same subspaces for training and test speakers
    basis = np.linalg.qr(rng.standard_normal((POOLED, POOLED)))[0]
    spk_basis, nuis_basis = basis[:, :rank], basis[:, rank:rank + 32]
    offset = 3.0 * rng.standard_normal(POOLED)
    rng = np.random.default_rng(seed)
    spk = np.repeat(np.arange(n_spk), utts)
    centroid = rng.standard_normal((n_spk, rank))[spk]
    session = session * rng.standard_normal((len(spk), rank))
    nuisance = 2.0 * rng.standard_normal((len(spk), 32))
    pooled = (centroid + session) @ spk_basis.T + nuisance @ nuis_basis.T + offset
    pooled = pooled[:, None] + 0.5 * rng.standard_normal((len(spk), views, POOLED)) / np.sqrt(POOLED / rank)
    return pooled.astype(np.float32), spk


def write_cache(out: Path, pooled: np.ndarray, spk: np.ndarray, prefix: str) -> list[str]:
    from mrlcache import cache
    from mrlcache.corpus import Utterance

    ids = [f"{prefix}{s:05d}/v/{i:06d}.wav" for i, s in enumerate(spk)]
    manifest = [Utterance(u, f"/none/{i}.wav", u.split("/")[0]) for i, u in enumerate(ids)]
    meta = {"model_config": {"synthetic": True}, "weights_sha256": "0" * 64, "pooled_dim": POOLED,
            "sample_rate": 16000, "mode": "train", "crop_seconds": 2.0, "views": pooled.shape[1],
            "augment": {}, "seed": 0, "dtype": "float16", "shard_size": 4096}
    with cache.CacheWriter(out, meta, manifest) as writer:
        for k in range(writer.num_shards):
            rows = list(writer.shard_rows(k))
            writer.write_shard(k, rows, pooled[rows], {}, 0.0)
        writer.finish()
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speakers", type=int, default=5994)
    ap.add_argument("--utts", type=int, default=10, help="utterances per training speaker")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--rank", type=int, default=128, help="dimension of the speaker subspace")
    ap.add_argument("--session", type=float, default=0.9,
                    help="within-speaker spread in the speaker subspace, relative to the between-speaker one")
    ap.add_argument("--test-speakers", type=int, default=300)
    ap.add_argument("--trials", type=int, default=40000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rates", default="1,0.5,0.25")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from mrlcache.fit import fit

    dims = (64, 128, 192, 256)
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pooled, spk = vectors(args.speakers, args.utts, args.views, args.rank, args.session, seed=1)
        write_cache(tmp / "train", pooled, spk, "id")
        pooled, spk = vectors(args.test_speakers, 8, 1, args.rank, args.session, seed=2)
        ids = write_cache(tmp / "test", pooled, spk, "tst")
        rng = np.random.default_rng(3)
        a, b = rng.integers(0, len(ids), (2, args.trials))
        same = rng.random(args.trials) < 0.5  # half target trials: b from a's speaker
        for t in np.flatnonzero(same):
            choices = np.flatnonzero((spk == spk[a[t]]) & (np.arange(len(ids)) != a[t]))
            b[t] = rng.choice(choices)
        keep = a != b
        lines = [f"{int(spk[i] == spk[j])} {ids[i]} {ids[j]}" for i, j in zip(a[keep], b[keep])]
        (tmp / "trials.txt").write_text("\n".join(lines) + "\n")
        print(f"{args.speakers} training speakers x {args.utts} utts x {args.views} views, "
              f"{args.test_speakers} test speakers, {len(lines)} trials, {args.epochs} epochs")
        print(f"{'rate':>5} " + " ".join(f"{'EER@' + str(d):>8}" for d in dims)
              + f" {'mean':>7} {'samples/s':>10} {'ms/step':>8}")
        for rate in rates:
            run = fit(tmp / "train", dims, tmp / f"run-{rate}", epochs=args.epochs, batch_size=256,
                      val_cache=str(tmp / "test"), val_trials=str(tmp / "trials.txt"),
                      val_every=args.epochs, head_only=True, progress=False, seed=args.seed,
                      class_sample=rate)
            hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
            last = hist[-1]
            sps = np.median([h["samples_per_s"] for h in hist[:-1]] or [last["samples_per_s"]])
            eers = [100 * last["val_eer"][str(d)] for d in dims]
            print(f"{rate:>5g} " + " ".join(f"{e:>7.2f}%" for e in eers)
                  + f" {np.mean(eers):>6.2f}% {sps:>10.0f} {256e3 / sps:>8.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
