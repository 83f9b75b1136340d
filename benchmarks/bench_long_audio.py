"""Peak memory and time of one long eval utterance: one pass against window by window.

    python benchmarks/bench_long_audio.py                          # b0: 5, 10, 20 min (~25 min)
    python benchmarks/bench_long_audio.py --variant b2 --minutes 5 10 --windows none 300 60

Each row runs in a fresh process (so ``ru_maxrss`` is that row's peak): speech-like
synthetic audio of the given length, a random-init backbone (memory and time do not
depend on the weights' values), ``mrlcache.streams.windows.pooled`` under inference mode
on the CPU, float32. It also prints the cosine between each windowed vector and the
one-pass vector of the same audio (how much windowing moves the pooled vector of a random
network; trained networks are not available here). Run by hand; never a test.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def child(variant: str, minutes: float, window: str, threads: int) -> None:
    import numpy as np
    import torch

    from mrlcache.backbone.loading import load_backbone
    from mrlcache.streams import windows

    sys.path.insert(0, "tests")
    from conftest import speech_like

    torch.set_num_threads(threads)
    model = load_backbone(variant, random_init=True, seed=0).eval()
    rng = np.random.default_rng(0)
    # A minute of one voice, then the next minute another f0: a long recording of turns.
    parts = [speech_like(60.0, seed=int(rng.integers(1 << 30)), f0=100.0 + 15 * (m % 4)) for m in range(int(minutes))]
    wave = torch.from_numpy(np.concatenate(parts))[None]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = None if window == "none" else float(window)
    start = time.perf_counter()
    with torch.inference_mode():
        vector = windows.pooled(model, wave, seconds)[0].numpy()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"elapsed": elapsed, "peak_mb": peak / 1024, "before_mb": base / 1024,
                      "vector": vector.tolist()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--minutes", nargs="+", type=float, default=[5, 10, 20])
    parser.add_argument("--windows", nargs="+", default=["none", "300", "60"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-whole-above", type=float, default=20, help="minutes: no one-pass row beyond this")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.variant, float(args.child[0]), args.child[1], int(args.child[2]))
        return

    import numpy as np

    print(f"{args.variant}, random init, float32, {args.threads} threads, CPU\n")
    print("| audio | window | windows | time (s) | peak RSS (GB) | model + audio before (GB) | cosine to one pass |")
    print("|---|---|---|---|---|---|---|")
    for minutes in args.minutes:
        whole = None
        for window in args.windows:
            if window == "none" and minutes > args.skip_whole_above:
                continue
            out = subprocess.run([sys.executable, __file__, "--variant", args.variant, "--child", str(minutes), window,
                                  str(args.threads)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            vector = np.asarray(row["vector"])
            if window == "none":
                whole = vector
            cos = "" if whole is None else f"{vector @ whole / np.linalg.norm(vector) / np.linalg.norm(whole):.6f}"
            count = 1 if window == "none" else -(-int(minutes * 60 * 16000) // int(float(window) * 16000))
            print(f"| {minutes:g} min | {window} | {count} | {row['elapsed']:.1f} | {row['peak_mb'] / 1024:.2f} "
                  f"| {row['before_mb'] / 1024:.2f} | {cos} |", flush=True)


if __name__ == "__main__":
    main()
