"""EER of long test utterances embedded in one pass against window by window.

    python benchmarks/bench_window_eer.py            # ~10 minutes on 2 cores
    python benchmarks/bench_window_eer.py --window 5 --seconds 20 30

A synthetic corpus (``mrlcache make-corpus``) with long utterances; a random-init b0
(no published weights here) whose train-mode cache fits a Matryoshka head; then the
test speakers' eval cache twice, ``--window-seconds none`` and ``--window-seconds W``, each
scored with ``mrlcache eer`` on the corpus's trials. Prints EER and minDCF per dim for
both, and the mean cosine between each utterance's two vectors. Run by hand; never a test.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def mrl(*args):
    subprocess.run([sys.executable, "-m", "mrlcache", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=8.0, help="seconds per window of the windowed cache")
    parser.add_argument("--seconds", nargs=2, type=float, default=[24.0, 32.0], help="utterance length range")
    parser.add_argument("--speakers", type=int, default=24)
    parser.add_argument("--test-speakers", type=int, default=6)
    parser.add_argument("--utterances", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="new work directory (default: a temporary one)")
    args = parser.parse_args()

    import mrlcache.cache

    root = args.out or Path(tempfile.mkdtemp(prefix="window-eer-"))
    corpus = root / "corpus"
    mrl("make-corpus", corpus, "--speakers", args.speakers, "--test-speakers", args.test_speakers,
        "--utterances", args.utterances, "--min-seconds", args.seconds[0], "--max-seconds", args.seconds[1],
        "--overwrite")
    common = ["--random-init", "--variant", "b0", "--seed", 0, "--quiet"]
    mrl("extract", "--data", corpus / "train", "--out", root / "train", "--views", 4, "--overwrite", *common)
    mrl("fit", "--cache", root / "train", "--dims", "32,64,128", "--out", root / "run", "--epochs", 20)
    results = {}
    for window in ("none", f"{args.window:g}"):
        cache = root / f"test-{window}"
        mrl("extract", "--data", corpus / "test", "--out", cache, "--mode", "eval", "--window-seconds", window,
            "--dtype", "float32", "--overwrite", *common)
        report = root / f"eer-{window}.json"
        mrl("eer", "--model", root / "run" / "model.pt", "--trials", corpus / "trials.txt", "--cache", cache,
            "--json", report)
        results[window] = json.loads(report.read_text())
    a, b = (mrlcache.cache.open(root / f"test-{w}") for w in results)
    va, vb = a.read("pooled", view=0), b.read("pooled", view=0)
    cos = (va * vb).sum(1) / np.linalg.norm(va, axis=1) / np.linalg.norm(vb, axis=1)
    windowed = b.meta["summary"]["windowed_files"]
    print(f"{len(a)} test utterances of {args.seconds[0]:g}-{args.seconds[1]:g} s, {len(windowed)} in windows of "
          f"{args.window:g} s (median {int(np.median(list(windowed.values())))} windows); pooled-vector cosine "
          f"one pass vs windows: mean {cos.mean():.4f}, min {cos.min():.4f}\n")
    print("| dim | EER one pass (%) | EER windows (%) | minDCF .01 one pass | minDCF .01 windows |")
    print("|---|---|---|---|---|")
    one, win = ({r["dim"]: r for r in res["results"] if r["system"] == "mrl"} for res in results.values())
    for dim in sorted(one):
        print(f"| {dim} | {100 * one[dim]['eer']:.2f} | {100 * win[dim]['eer']:.2f} "
              f"| {one[dim]['min_dcf_0.01']:.3f} | {win[dim]['min_dcf_0.01']:.3f} |")

if __name__ == "__main__":
    main()
