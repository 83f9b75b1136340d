"""CPU extraction speed of every frozen encoder: ReDimNet b0/b2, ECAPA-TDNN, CAM++.

    python benchmarks/bench_encoders.py                      # batch 8 x 2 s, fp32 and bf16
    python benchmarks/bench_encoders.py --threads 1 2 --onnx # also the onnxruntime engine

Random weights of each encoder's published size (speed does not depend on the values):
ReDimNet b0 and b2, ECAPA-TDNN c1024 (spkrec-ecapa-voxceleb), CAM++ e192 (zh-en). Times
``pooled(wave)`` (front end, encoder, statistics pooling) on one batch of ``batch`` crops of
``crop`` seconds and prints a markdown table: audio seconds per wall second (x real time)
and the real-time factor (wall / audio). bf16 is autocast (front ends stay float32); on a CPU
without avx512_bf16 or AMX it is emulated and slower. Run by hand; never a test.
"""

import argparse
import time

import torch

from mrlcache.backbone.loading import load_backbone

ENCODERS = [("redimnet", "b0"), ("redimnet", "b2"), ("ecapa-tdnn", "c1024"), ("campplus", "e192")]


def speed(pooled, waves, bf16, min_time):
    """Audio seconds per wall second of ``pooled(waves)``, repeated for at least ``min_time``."""
    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pooled(waves)

    run()  # warm-up: allocator, oneDNN kernel selection
    rounds, start = 0, time.perf_counter()
    while True:
        run()
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return rounds * waves.numel() / 16000 / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    parser.add_argument("--crop", type=float, default=2.0, help="seconds per crop")
    parser.add_argument("--batch", type=int, default=8, help="crops per batch")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds timed per row")
    parser.add_argument("--onnx", action="store_true", help="also time the onnxruntime engine (fp32)")
    args = parser.parse_args()

    waves = torch.randn(args.batch, int(args.crop * 16000), generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}; batch {args.batch} x {args.crop:g} s; x real time = audio s / wall s\n")
    print("| encoder | pooled dim | threads | engine | precision | x real time | real-time factor |")
    print("|---|---|---|---|---|---|---|")
    for backbone, config in ENCODERS:
        model = load_backbone(config, backbone=backbone, random_init=True)
        for threads in args.threads:
            torch.set_num_threads(threads)
            engines = [("torch", model.pooled, False), ("torch", model.pooled, True)]
            if args.onnx:
                from mrlcache.export import OnnxBackbone

                engines.append(("onnxruntime", OnnxBackbone(model, threads=threads).pooled, False))
            for engine, pooled, bf16 in engines:
                x = speed(pooled, waves, bf16, args.min_time)
                print(f"| {backbone} {config} | {model.pooled_dim} | {threads} | {engine} | "
                      f"{'bf16 autocast' if bf16 else 'fp32'} | {x:.1f} | {1 / x:.3f} |", flush=True)


if __name__ == "__main__":
    main()
