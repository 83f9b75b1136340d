"""CPU forward throughput of ReDimNet (audio seconds per wall-clock second).

    python benchmarks/bench_model.py                    # b0 and b2, ~1-2 minutes
    python benchmarks/bench_model.py --variants b2 --crop 4 --batch 16

Random weights (the speed does not depend on their values). For each variant, thread count
and precision (float32, bfloat16 autocast; features always float32) it times the same
`batch` crops of `crop` seconds run one utterance at a time and as one batch, and prints a
markdown table. Run by hand on an idle machine; never a test.
"""

import argparse
import time

import torch

from mrlcache.backbone.loading import load_backbone


def throughput(model, waves, batched, bf16, min_time):
    """Audio seconds per wall second of model.pooled over `waves` (N, T), repeated for >= min_time."""
    inputs = [waves] if batched else [w[None] for w in waves]

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for x in inputs:
                model.pooled(x)

    run()  # warm-up: allocator, oneDNN kernel selection
    rounds, start = 0, time.perf_counter()
    while True:
        run()
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            break
    return rounds * waves.numel() / 16000 / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["b0", "b2"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--crop", type=float, default=2.0, help="seconds per crop")
    parser.add_argument("--batch", type=int, default=8, help="crops per batch")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds timed per row")
    args = parser.parse_args()

    waves = torch.randn(args.batch, int(args.crop * 16000), generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}; {args.batch} crops of {args.crop:g} s; throughput in audio s / wall s\n")
    print("| model | threads | precision | one at a time | batch of %d | batch speed-up |" % args.batch)
    print("|---|---|---|---|---|---|")
    for name in args.variants:
        model = load_backbone(name, random_init=True)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for bf16 in (False, True):
                single = throughput(model, waves, False, bf16, args.min_time)
                batched = throughput(model, waves, True, bf16, args.min_time)
                print(f"| {name} | {threads} | {'bf16 autocast' if bf16 else 'fp32'} | "
                      f"{single:.1f} | {batched:.1f} | {batched / single:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
