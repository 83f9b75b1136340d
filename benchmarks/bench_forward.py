"""Backbone forward against the machine's matmul rate, every engine side by side in one run.

    python benchmarks/bench_forward.py                       # b2, batch 8 x 2 s, 2 threads, 3 rounds
    python benchmarks/bench_forward.py --variants b0 b2 --threads 1 --rounds 5 --startup

Contenders, interleaved round by round so that a shared machine's load hits them alike:
``ReDimNet.pooled`` as loaded (torch), its frozen inference copy (``for_inference``:
BatchNorm folded, channels-last), and the onnxruntime engine (spinning threads and not).
Each round also times a float32 matmul (512 x 1024 @ 1024 x 1024) as the attainable rate.
FLOPs of the forward are counted by ``torch.utils.flop_counter`` (convolutions and
matmuls). Reported: best-of-rounds wall and CPU (process) time, GFLOP/s and the fraction
of the matmul rate, in wall and in CPU time (CPU time is what a loaded machine distorts
least). The process's glibc allocator is set as ``extract``, ``embed`` and ``verify`` set it
(:func:`mrlcache.runtime.reuse_large_allocations`), unless ``--glibc-default``: it is
process-wide, so compare the two settings by running the script twice, alternately. ``--startup`` times creating the onnxruntime engine twice: the first exports it
(or reuses a file from an earlier run), the second reads the cached file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mrlcache.backbone.loading import load_backbone
from mrlcache.runtime import reuse_large_allocations


def clock(fn, repeat=2):
    """(best wall s, best CPU s) of ``repeat`` calls after a warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["b2"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-onnx", dest="onnx", action="store_false")
    ap.add_argument("--startup", action="store_true", help="time the onnxruntime engine's creation, cold and cached")
    ap.add_argument("--glibc-default", action="store_true",
                    help="keep glibc's allocator defaults (fresh pages for every large activation)")
    args = ap.parse_args()
    allocator = "glibc defaults" if args.glibc_default else "heap reuse (as the commands)"
    if not args.glibc_default:
        reuse_large_allocations()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.crop:g} s, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, allocator: {allocator}, load average {os.getloadavg()[0]:.1f} "
          f"at start, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    matmul_flops = 10 * 2 * 512 * 1024 * 1024
    wave = torch.randn(args.batch, int(args.crop * 16000), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in args.variants:
        model = load_backbone(name, random_init=True, seed=0).eval()
        with torch.inference_mode():
            counter = FlopCounterMode(display=False)
            with counter:
                model.pooled(wave)
        flops = counter.get_total_flops()
        contenders = {"torch": model.pooled, "torch for_inference": model.for_inference().pooled}
        if args.onnx:
            from mrlcache.export.engine import OnnxBackbone

            for spin in (True, False):
                if args.startup and spin:
                    with tempfile.TemporaryDirectory() as tmp:
                        t0 = time.perf_counter()
                        OnnxBackbone(model, threads=args.threads, cache_dir=tmp)
                        t1 = time.perf_counter()
                        OnnxBackbone(model, threads=args.threads, cache_dir=tmp)
                        t2 = time.perf_counter()
                    print(f"{name}: onnxruntime engine start-up: first {t1 - t0:.1f} s (export), "
                          f"second {t2 - t1:.1f} s (cached file)")
                engine = OnnxBackbone(model, threads=args.threads, spin=spin)
                contenders[f"onnxruntime{'' if spin else ' (no spinning)'}"] = engine.pooled
        for r in range(args.rounds):
            with torch.inference_mode():
                mm = clock(lambda: [a @ b for _ in range(10)], repeat=3)
                results.setdefault((name, "matmul"), []).append(mm)
                for label, fn in contenders.items():
                    results.setdefault((name, label), []).append(clock(lambda: fn(wave)))
        print(f"| {name} ({flops / 1e9:.1f} GFLOP) | wall ms | CPU ms | audio s/s | GFLOP/s (wall) | of matmul (wall) "
              f"| of matmul (CPU) |")
        print("|---|---|---|---|---|---|---|")
        mm_wall = min(w for w, _ in results[(name, "matmul")])
        mm_cpu = min(c for _, c in results[(name, "matmul")])
        print(f"| fp32 matmul | {mm_wall * 1000:.0f} | {mm_cpu * 1000:.0f} | - | {matmul_flops / mm_wall / 1e9:.1f} "
              f"| 1.00 | 1.00 |")
        for label in contenders:
            wall = min(w for w, _ in results[(name, label)])
            cpu = min(c for _, c in results[(name, label)])
            print(f"| {label} | {wall * 1000:.0f} | {cpu * 1000:.0f} | {wave.numel() / 16000 / wall:.1f} "
                  f"| {flops / wall / 1e9:.1f} | {flops / wall / (matmul_flops / mm_wall):.2f} "
                  f"| {flops / cpu / (matmul_flops / mm_cpu):.2f} |")
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")


if __name__ == "__main__":
    main()
