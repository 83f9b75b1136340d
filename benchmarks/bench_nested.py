"""EER per nested dim: plain MRL, --margins, --grad-scaling and fixed-size heads, over seeds.

Run by hand (a few minutes on 2 cores):  python benchmarks/bench_nested.py [--seeds 0,1,2]

The synthetic cache of bench_class_sample.py, smaller: speakers are centroids in a
``--rank``-dim subspace of a 512-dim pooled space, with a session spread in that subspace,
a removable nuisance and offset, and per-view noise. For each seed, one fit per variant
(plain MRL with --fixed-baselines, so its fixed heads come from the same data order and
settings; --margins; --grad-scaling), all validated once, after the last epoch, on the same
trials of unseen speakers. Prints, per variant and dim, the mean EER over seeds and its
spread (sample standard deviation), then the ratio MRL/fixed per dim.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_class_sample import vectors, write_cache  # noqa: E402


def trials_file(path: Path, ids, spk, n: int) -> None:
    """Half target trials, half random pairs, of the test speakers."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, len(ids), (2, n))
    for t in np.flatnonzero(rng.random(n) < 0.5):
        b[t] = rng.choice(np.flatnonzero((spk == spk[a[t]]) & (np.arange(len(ids)) != a[t])))
    keep = a != b
    path.write_text("".join(f"{int(spk[i] == spk[j])} {ids[i]} {ids[j]}\n" for i, j in zip(a[keep], b[keep])))


def val_eer(run: Path, dims) -> dict:
    best = json.loads((run / "summary.json").read_text())["best"]
    return {d: 100 * best["eer"][str(d)] for d in dims}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speakers", type=int, default=500)
    ap.add_argument("--utts", type=int, default=8)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--session", type=float, default=0.9)
    ap.add_argument("--test-speakers", type=int, default=200)
    ap.add_argument("--trials", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--dims", default="8,32,128,256")
    ap.add_argument("--margins", default="0.1,0.15,0.2,0.2")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    from mrlcache.fit import fit

    dims = tuple(int(d) for d in args.dims.split(","))
    margins = tuple(float(m) for m in args.margins.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {"mrl": {"fixed_baselines": True}, "margins": {"margins": margins},
                "grad-scaling": {"grad_scaling": True}}
    eers = {name: [] for name in [*variants, "fixed"]}  # name -> [per seed {dim: EER %}]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pooled, spk = vectors(args.speakers, args.utts, args.views, args.rank, args.session, seed=1)
        write_cache(tmp / "train", pooled, spk, "id")
        pooled, spk = vectors(args.test_speakers, 6, 1, args.rank, args.session, seed=2)
        ids = write_cache(tmp / "test", pooled, spk, "tst")
        trials_file(tmp / "trials.txt", ids, spk, args.trials)
        common = dict(epochs=args.epochs, batch_size=256, val_cache=str(tmp / "test"),
                      val_trials=str(tmp / "trials.txt"), val_every=args.epochs, head_only=True, progress=False)
        for seed in seeds:
            for name, options in variants.items():
                run = fit(tmp / "train", dims, tmp / f"{name}-{seed}", seed=seed, **common, **options)
                eers[name].append(val_eer(run, dims))
                if options.get("fixed_baselines"):
                    eers["fixed"].append({d: val_eer(run / "fixed" / str(d), (d,))[d] for d in dims})
            print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"{args.speakers} training speakers x {args.utts} utts x {args.views} views (512-d, rank {args.rank}), "
          f"{args.test_speakers} test speakers, {args.epochs} epochs, seeds {seeds}; EER % mean +- sd")
    print(f"{'variant':<19}" + "".join(f"{'dim ' + str(d):>15}" for d in dims))
    for name, runs in eers.items():
        cells = [np.array([r[d] for r in runs]) for d in dims]
        print(f"{name:<19}" + "".join(f"{c.mean():>8.2f} +-{c.std(ddof=1):>5.2f}" for c in cells))
    for name in variants:
        ratios = [np.array([a[d] / f[d] for a, f in zip(eers[name], eers["fixed"])]) for d in dims]
        print(f"{name + '/fixed':<19}" + "".join(f"{r.mean():>8.3f} +-{r.std(ddof=1):>5.3f}" for r in ratios))
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
