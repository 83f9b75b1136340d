"""Time ``mrlcache.metrics`` and ``mrlcache.scoring`` at VoxCeleb1-H scale (run by hand).

    python benchmarks/bench_metrics.py [--trials 550000] [--repeat 5]

Vox1-H (cleaned) has about 550,000 trials; Vox1-E about 580,000. Scores are random
(Gaussian targets shifted by 2) and rounded to 4 decimals so ties occur, as they do in
real score files written with limited precision.
"""

import argparse
import time

import numpy as np

from mrlcache import metrics, scoring


def best_of(fn, repeat):
    """Best wall time of ``repeat`` calls (seconds)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=550_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--utterances", type=int, default=4_874, help="Vox1 has 4,874 test files")
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    labels = (rng.random(args.trials) < 0.5).astype(np.int8)
    scores = np.round(rng.normal(size=args.trials) + 2.0 * labels, 4)
    print(f"{args.trials} trials, {np.unique(scores).size} distinct scores")
    print(f"eer                 {best_of(lambda: metrics.eer(scores, labels), args.repeat):.3f} s")
    print(f"min_dcf             {best_of(lambda: metrics.min_dcf(scores, labels), args.repeat):.3f} s")
    print(f"detection_curve     {best_of(lambda: metrics.detection_curve(scores, labels), args.repeat):.3f} s")
    print(f"min_cllr (PAV)      {best_of(lambda: metrics.min_cllr(scores, labels), args.repeat):.3f} s")
    print(f"cllr                {best_of(lambda: metrics.cllr(scores, labels), args.repeat):.3f} s")
    print(f"act_dcf             {best_of(lambda: metrics.act_dcf(scores, labels), args.repeat):.3f} s")

    emb = rng.normal(size=(args.utterances, args.dim)).astype(np.float32)
    enroll = rng.integers(0, args.utterances, args.trials)
    test = rng.integers(0, args.utterances, args.trials)
    dims = [64, 128, 192, 256]
    t = best_of(lambda: scoring.score_trials(emb, enroll, test, dims), max(1, args.repeat // 2))
    print(f"score_trials {dims} {t:.3f} s")


if __name__ == "__main__":
    main()
