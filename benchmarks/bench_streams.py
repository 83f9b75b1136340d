"""Bytes per utterance and extract time per stream (b0 random init, a tiny synthetic corpus).

    PYTHONPATH=$PWD python benchmarks/bench_streams.py [--speakers 4] [--utterances 4]

One extract per mode with every stream (train: 2 views of 2 s crops; eval: whole
utterances of 2-4 s), float16 storage, zarr, one model thread. Bytes are the stream's
arrays on disk (cache.json's ``summary.stream_bytes``) divided by the utterances;
seconds are the time spent computing each stream (``summary.stream_seconds``) per
utterance. Runs in well under 2 minutes on 2 CPU cores.
"""

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch

from mrlcache.backbone.loading import load_backbone
from mrlcache.corpus import scan_tree
from mrlcache.demo.synth import make_corpus
from mrlcache.extract import ExtractConfig, extract

STREAMS = "pooled,layers,fbank,mfcc,f0"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speakers", type=int, default=4)
    parser.add_argument("--utterances", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_corpus(Path(tmp) / "corpus", speakers=args.speakers, utterances=args.utterances, test_speakers=2)
        utts = scan_tree(Path(tmp) / "corpus" / "train")
        model = load_backbone("b0", random_init=True, seed=0)
        for mode in ("train", "eval"):
            cfg = ExtractConfig.of(mode=mode, views=2, streams=STREAMS, workers=0, device="cpu", precision="fp32")
            summary = extract(utts, model, Path(tmp) / mode, cfg, weights_source="random-init:b0:seed=0",
                              save_backbone=True, progress=False)
            n = summary["utterances"]
            for name in STREAMS.split(","):
                rows.append({"mode": mode, "stream": name, "bytes_per_utt": summary["stream_bytes"][name] / n,
                             "ms_per_utt": 1000 * summary["stream_seconds"][name] / n})
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {datetime.date.today()}, "
          f"torch {torch.__version__}, {len(utts)} utterances, b0 random init, float16, zarr, 1 thread")
    print("| mode | stream | KiB / utterance | ms / utterance |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['stream']} | {r['bytes_per_utt'] / 1024:.1f} | {r['ms_per_utt']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
