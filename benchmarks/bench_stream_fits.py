"""Fit speed and EER per mode of the multi-stream trainer on the synthetic corpus (run by hand).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_stream_fits.py [--speakers 40] [--epochs 8]

Makes a synthetic corpus (``mrlcache make-corpus``), extracts ``pooled,layers,fbank,mfcc,f0``
once with a random-init ReDimNet b0 (train mode for the training speakers, eval mode for
the test speakers), then fits the seed tool's modes as mrlcache fit options and scores each
with ``mrlcache eer`` on the corpus's trial list:

- mode 1: ``--inputs layers`` (mrl and ecapa heads),
- mode 2: ``--inputs fbank,f0`` and ``--inputs mfcc,f0`` (ecapa),
- mode 3: ``--inputs layers,fbank,f0`` with each fusion (ecapa),
- and today's ``--inputs pooled --head mrl``.

Prints one markdown table: fit samples/s (training utterances x epochs / fit seconds),
EER % at every dim. The backbone is random, so the numbers compare modes and heads on one
corpus; they say nothing of what published weights reach.
"""

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

from mrlcache.cli import main as cli

SMALL_ECAPA = ["--ecapa-channels", "64", "--ecapa-scale", "4", "--ecapa-mfa-channels", "192",
               "--ecapa-bottleneck", "32", "--encoder-dim", "64"]
RUNS = {
    "pooled / mrl": ["--inputs", "pooled", "--head", "mrl"],
    "1: layers / mrl": ["--inputs", "layers", "--head", "mrl"],
    "1: layers / ecapa": ["--inputs", "layers", "--head", "ecapa", *SMALL_ECAPA],
    "2: fbank,f0 / ecapa": ["--inputs", "fbank,f0", "--head", "ecapa", *SMALL_ECAPA],
    "2: mfcc,f0 / ecapa": ["--inputs", "mfcc,f0", "--head", "ecapa", *SMALL_ECAPA],
    "3: concat / ecapa": ["--inputs", "layers,fbank,f0", "--fusion", "concat", "--head", "ecapa", *SMALL_ECAPA],
    "3: cross-attention / ecapa": ["--inputs", "layers,fbank,f0", "--fusion", "cross-attention", "--head", "ecapa",
                                   *SMALL_ECAPA],
    "3: gating / ecapa": ["--inputs", "layers,fbank,f0", "--fusion", "gating", "--head", "ecapa", *SMALL_ECAPA],
}


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exit_code != 0:
        raise SystemExit(f"mrlcache {' '.join(map(str, args))} failed:\n{result.output}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speakers", type=int, default=40)
    parser.add_argument("--utterances", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=None, help="run names to keep (default all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    dims = "32,64,128"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run("make-corpus", tmp / "corpus", "--speakers", args.speakers, "--utterances", args.utterances,
            "--seed", 0)
        streams = ["--streams", "pooled,layers,fbank,mfcc,f0", "--quiet"]
        run("extract", "--data", tmp / "corpus" / "train", "--out", tmp / "train", "--random-init", "--variant",
            "b0", "--views", "2", "--crop-seconds", "2", *streams)
        run("extract", "--data", tmp / "corpus" / "test", "--out", tmp / "test", "--weights",
            tmp / "train" / "backbone.pt", "--mode", "eval", *streams)
        n_train = json.loads((tmp / "train" / "cache.json").read_text())["summary"]["utterances"]
        for name, options in RUNS.items():
            if args.only and name not in args.only:
                continue
            out = tmp / name.replace(" ", "").replace("/", "_").replace(":", "").replace(",", "+")
            tick = time.perf_counter()
            run("fit", "--cache", tmp / "train", "--dims", dims, "--out", out, "--epochs", args.epochs,
                "--batch-size", "64", "--seed", 0, "--quiet", *options)
            seconds = time.perf_counter() - tick
            run("eer", "--model", out / "model.pt", "--trials", tmp / "corpus" / "trials.txt", "--cache",
                tmp / "test", "--json", out / "eer.json")
            eers = {r["dim"]: r["eer"] for r in json.loads((out / "eer.json").read_text())["results"]
                    if r["system"] == "mrl"}
            rows.append({"run": name, "samples_per_s": n_train * args.epochs / seconds, "seconds": seconds,
                         "eer": eers})
            print(f"{name}: {seconds:.0f} s", flush=True)
    print(f"\n# {platform.processor() or platform.machine()}, {datetime.date.today()}, {args.speakers} speakers x "
          f"{args.utterances} utterances, b0 random init, {args.epochs} epochs")
    print("| mode / head | fit samples/s | " + " | ".join(f"EER % @{d}" for d in dims.split(",")) + " |")
    print("|---|---:|" + "---:|" * len(dims.split(",")))
    for r in rows:
        print(f"| {r['run']} | {r['samples_per_s']:.0f} | "
              + " | ".join(f"{100 * r['eer'][int(d)]:.2f}" for d in dims.split(",")) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
