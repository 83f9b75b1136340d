"""GPU throughput of mrlcache in one command: forward, extraction, head fit (no downloads).

    python benchmarks/bench_gpu.py                 # one GPU, under five minutes
    python benchmarks/bench_gpu.py --tiny          # CPU, tiny sizes, seconds (what the test runs)

Rows of one table, each with its peak GPU memory:

- **forward**: ``pooled`` of b0/b2/b6 on 2 s crops at batch 32-256, fp32 / bf16 / fp16
  autocast (features stay fp32), in audio seconds per wall second, with the ``torch`` engine
  (what ``extract`` runs on a GPU, ``auto`` included); the ``fused`` engine (the frozen
  inference copy, ``ReDimNet.for_inference``: BatchNorm folded, channels-last) at batch 128,
  to see whether it pays on a GPU too; ``torch.compile`` on for b2 at batch 128, at the
  extract row's precision (compile time reported apart: it is paid once per shape and
  precision).
- **extract**: ``mrlcache.extract.extract`` end to end on a synthetic corpus (train mode,
  2 s crops x 4 views, DataLoader workers, pinned memory), against the bare forward of
  the same engine (torch), model, batch and precision.
- **fit**: head-only fit on a synthetic cache (b2's pooled size, 5994 classes), samples/s.

Random weights: the speed does not depend on their values. Never a timed test; the test
suite only checks that ``--tiny`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mrlcache.backbone.loading import load_backbone  # noqa: E402

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def timed(fn, device, min_seconds: float, min_calls: int = 3) -> float:
    """Wall seconds per call of ``fn`` after one warm-up call, over >= min_seconds and min_calls."""
    fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if calls >= min_calls and elapsed >= min_seconds:
            return elapsed / calls


def forward_rows(args, device) -> list[dict]:
    rows = []
    samples = int(args.crop * 16000)
    for variant in args.variants:
        model = load_backbone(variant, random_init=True, seed=0).to(device).eval()
        engines = {"torch": model, "fused": model.for_inference()}
        for precision in args.precisions:
            runs = [(batch, "torch", False) for batch in args.batches] + [(args.side_batch, "fused", False)]
            if args.compile and variant == args.compile_variant and precision == args.extract_precision:
                runs.append((args.side_batch, "torch", True))  # one compile: a minute or more each
            for batch, engine, compiled in runs:
                reset_peak(device)
                wave = torch.randn(batch, samples, device=device)
                pooled = engines[engine].pooled
                fn = torch.compile(pooled, dynamic=False) if compiled else pooled

                def run():
                    with torch.inference_mode(), torch.autocast(device.type, dtype=AUTOCAST[precision],
                                                                enabled=AUTOCAST[precision] is not None):
                        fn(wave)

                compile_s = None
                if compiled:
                    tick = time.perf_counter()
                    run()
                    sync(device)
                    compile_s = time.perf_counter() - tick
                try:
                    per_call = timed(run, device, args.min_seconds, min_calls=1 if args.tiny else 3)
                except RuntimeError as err:  # out of memory at the largest batches: say so
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    rows.append({"what": "forward", "engine": engine, "model": variant, "batch": batch,
                                 "precision": precision, "compile": compiled, "value": None,
                                 "note": str(err).splitlines()[0][:60]})
                    continue
                rows.append({"what": "forward", "engine": engine, "model": variant, "batch": batch,
                             "precision": precision, "compile": compiled, "value": batch * args.crop / per_call,
                             "unit": "audio s/s", "peak_mb": peak_mb(device),
                             "note": f"compile {compile_s:.0f} s" if compile_s is not None else ""})
                print(format_row(rows[-1]), file=sys.stderr, flush=True)
        del model, engines
    return rows


def extract_rows(args, device, tmp: Path) -> list[dict]:
    from mrlcache.corpus import scan_tree
    from mrlcache.demo.synth import make_corpus
    from mrlcache.extract import ExtractConfig, extract

    make_corpus(tmp / "corpus", speakers=args.corpus_speakers + 2, utterances=args.corpus_utterances, seed=0,
                test_speakers=2, seconds=(2.0, 4.0))
    utts = scan_tree(tmp / "corpus" / "train")
    views = 4
    model = load_backbone(args.extract_variant, random_init=True, seed=0)
    model.weights_sha256 = "benchmark"
    precision = args.extract_precision
    cfg = ExtractConfig.of(views=views, crop_seconds=args.crop, batch_size=args.extract_batch, workers=args.workers,
                        shard_size=len(utts), device=str(device), precision=precision, engine="torch")
    # The bare forward: the same engine, number of crops and batches, the crops already on the device.
    fast = model.to(device).eval()
    wave = torch.randn(args.extract_batch, int(args.crop * 16000), device=device)
    batches = -(-len(utts) * views // args.extract_batch)

    def bare():
        with torch.inference_mode(), torch.autocast(device.type, dtype=AUTOCAST[precision],
                                                    enabled=AUTOCAST[precision] is not None):
            for _ in range(batches):
                fast.pooled(wave)

    bare_s = timed(bare, device, 0.0, min_calls=1)
    reset_peak(device)
    tick = time.perf_counter()
    extract(utts, model, tmp / "cache", cfg, progress=False)
    sync(device)
    wall = time.perf_counter() - tick
    audio = len(utts) * views * args.crop
    return [{"what": "extract", "engine": "torch", "model": args.extract_variant, "batch": args.extract_batch,
             "precision": precision, "compile": False, "value": audio / wall, "unit": "audio s/s",
             "peak_mb": peak_mb(device),
             "note": f"{len(utts)} utts x {views} views, {args.workers} workers"
                     f"{', pinned memory' if device.type == 'cuda' else ''}: "
                     f"{bare_s / wall:.2f} of the bare forward ({audio / bare_s:.0f} audio s/s)"}]


def fit_rows(args, device, tmp: Path) -> list[dict]:
    from bench_fit import history, synthetic_cache

    from mrlcache.fit import fit

    pooled_dim = load_backbone("b2", random_init=True).pooled_dim
    synthetic_cache(tmp / "fitcache", args.fit_utts, args.fit_classes, pooled_dim)
    rows = []
    for precision in args.fit_precisions:
        reset_peak(device)
        run = fit(tmp / "fitcache", (64, 128, 192, 256), tmp / f"fit-{precision}", epochs=2, batch_size=256,
                  val_speakers=0, head_only=True, progress=False, precision=precision, device=str(device))
        h = history(run)[-1]  # the last epoch: warm
        rows.append({"what": "fit", "engine": "-", "model": f"head on b2 pooled ({pooled_dim})", "batch": 256,
                     "precision": precision, "compile": False, "value": h["samples_per_s"], "unit": "samples/s",
                     "peak_mb": peak_mb(device), "note": f"{args.fit_utts} utts x 4 views, {args.fit_classes} classes"})
    return rows


def format_row(r: dict) -> str:
    value = "-" if r["value"] is None else f"{r['value']:.4g} {r['unit']}"
    mem = "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
    return (f"| {r['what']} | {r['engine']} | {r['model']} | {r['batch']} | {r['precision']} "
            f"| {'on' if r['compile'] else 'off'} | {value} | {mem} | {r.get('note', '')} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: checks the script runs (seconds)")
    ap.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if args.tiny:
        args.variants, args.batches, args.min_seconds, args.crop = ["b0"], [2], 0.0, 0.5
        args.precisions = ["fp32"]
        args.compile = False
        args.corpus_speakers, args.corpus_utterances, args.extract_batch, args.workers = 2, 2, 4, 1
        args.extract_variant, args.extract_precision = "b0", "fp32"
        args.fit_utts, args.fit_classes, args.fit_precisions = 32, 4, ["fp32"]
    else:
        args.variants, args.batches, args.min_seconds, args.crop = ["b0", "b2", "b6"], [32, 64, 128, 256], 1.0, 2.0
        bf16 = gpu and torch.cuda.is_bf16_supported()
        args.precisions = ["fp32"] + (["bf16"] if bf16 else []) + (["fp16"] if gpu else [])
        args.corpus_speakers, args.corpus_utterances, args.extract_batch = 64, 8, 128
        args.workers = min(8, max(1, (os.cpu_count() or 2) - 1))
        args.extract_variant, args.extract_precision = "b2", ("bf16" if bf16 else "fp16") if gpu else "fp32"
        args.fit_utts, args.fit_classes = 50_000, 5994
        args.fit_precisions = ["fp32", "bf16"] if bf16 else ["fp32"]
    # the batch of the fused engine's rows and of the torch.compile row
    args.compile_variant, args.side_batch = "b2", (args.batches[0] if args.tiny else 128)

    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"{name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"crops of {args.crop:g} s; {os.cpu_count()} CPUs\n")
    rows = forward_rows(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        rows += extract_rows(args, device, Path(tmp))
        rows += fit_rows(args, device, Path(tmp))
    print("| what | engine | model | batch | precision | compile | throughput | peak GPU MiB | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(format_row(r))
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
