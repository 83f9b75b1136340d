"""Extraction throughput: the pipeline against the bare model forward and a naive loop.

    python benchmarks/bench_extract.py --variant b2 --speakers 12 --utterances 6 --views 3

Three ways over the same synthetic corpus and the same crops:
1. bare forward: every crop decoded and made beforehand, only ``model.pooled`` timed, in
   the batches extract uses (the ceiling: what the model alone can do);
2. ``mrlcache.extract.extract``: workers decode and augment while the model runs, shards
   written; the overhead is 1 - (2)/(1) and the model's busy fraction is reported;
3. a one-file-at-a-time loop: decode, make each view, one forward per view, no workers.
Prints one markdown table row per way (audio seconds of crops per wall second).
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mrlcache.audio import load_audio  # noqa: E402
from mrlcache.augment import AugmentConfig, Augmenter, make_view  # noqa: E402
from mrlcache.corpus import scan_tree  # noqa: E402
from mrlcache.extract import ExtractConfig, extract, shard_batches  # noqa: E402
from mrlcache.backbone.loading import load_backbone  # noqa: E402
from mrlcache.demo.synth import make_corpus  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="b2")
    parser.add_argument("--speakers", type=int, default=12)
    parser.add_argument("--utterances", type=int, default=6)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--crop-seconds", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_corpus(tmp / "corpus", speakers=args.speakers, utterances=args.utterances, seed=0, test_speakers=2)
        utts = scan_tree(tmp / "corpus" / "train")
        model = load_backbone(args.variant, random_init=True, seed=0)
        cfg = ExtractConfig.of(views=args.views, crop_seconds=args.crop_seconds, batch_size=args.batch_size,
                            workers=args.workers, shard_size=len(utts), device="cpu", precision="fp32")
        crop = int(args.crop_seconds * 16000)
        crop_audio = len(utts) * args.views * args.crop_seconds
        augmenter = Augmenter(AugmentConfig())

        # 1. bare forward on the very crops extract makes, in extract's batches.
        crops = [np.stack([make_view(load_audio(u.path), u.utt_id, v, seed=0, crop_samples=crop, augmenter=augmenter)
                           for v in range(args.views)]) for u in utts]
        per_batch = max(1, args.batch_size // args.views)
        batches = shard_batches(range(len(utts)), per_batch)
        with torch.inference_mode():
            model.pooled(torch.from_numpy(crops[0]))  # warm-up
            tick = time.perf_counter()
            for rows in batches:
                model.pooled(torch.from_numpy(np.concatenate([crops[r] for r in rows])))
            bare = time.perf_counter() - tick

        # 2. the extract pipeline (its summary also reports the model's busy fraction).
        model.weights_sha256 = "benchmark"
        tick = time.perf_counter()
        summary = extract(utts, model, tmp / "cache", cfg, progress=False)
        pipeline = time.perf_counter() - tick

        # 3. one file at a time, one view at a time, no workers.
        with torch.inference_mode():
            tick = time.perf_counter()
            for u in utts:
                wave = load_audio(u.path)
                for v in range(args.views):
                    view = make_view(wave, u.utt_id, v, seed=0, crop_samples=crop, augmenter=augmenter)
                    model.pooled(torch.from_numpy(view)[None])
            naive = time.perf_counter() - tick

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} model threads, {args.variant}, {len(utts)} utts x {args.views} views x "
          f"{args.crop_seconds} s, batch {args.batch_size}, workers {args.workers}")
    print("| way | wall s | crop audio s / s | vs bare forward |")
    print("|---|---|---|---|")
    for name, seconds in (("bare model forward", bare), ("mrlcache extract", pipeline), ("one file at a time", naive)):
        print(f"| {name} | {seconds:.2f} | {crop_audio / seconds:.1f} | {bare / seconds:.2f} |")
    print(f"model busy inside extract: {100 * summary['model_busy_fraction']:.0f}% of its wall time")


if __name__ == "__main__":
    main()
