"""``mrlcache eer`` wall time at VoxCeleb1-H scale (550,000 trials, 145,000 utterances), start-up included.

    python benchmarks/bench_eer.py --trees /work/main .         # old and new code, interleaved
    python benchmarks/bench_eer.py --dim 2304 --rounds 3         # b2's pooled size
    python benchmarks/bench_eer.py --dim 2304 --material /tmp/m2304 --trees /work/main .  # built once, kept

Builds once, in a temporary folder: a test cache of ``--utts`` imported float16 vectors
(speaker centroids plus noise, VoxCeleb-style ids), a small training cache and a head-only
model fitted on it for one epoch, and a VoxCeleb-layout trial list of ``--trials`` random
pairs. Then times the whole command ``python -m mrlcache eer --model ... --trials ...
--cache ...`` as a fresh process, once per tree per round, the trees interleaved (each
tree is put first on PYTHONPATH). Also prints the CPU time of each command (user + sys) and
the load average before it. ``--material DIR`` builds in DIR (if it holds no material yet)
and keeps it, so later runs time at once.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build(tmp: Path, utts: int, dim: int, trials: int, per_speaker: int = 120) -> tuple[Path, Path, Path]:
    from mrlcache.fit import fit
    from mrlcache.interop import import_vectors

    rng = np.random.default_rng(0)

    def cache(name, n, speakers_offset):
        spk = np.arange(n) // per_speaker
        ids = [f"id{10000 + speakers_offset + s:05d}/v{i % 7}{i:07d}/{i % per_speaker:05d}.wav" for i, s in enumerate(spk)]
        centroids = rng.standard_normal((spk.max() + 1, dim), dtype=np.float32)
        vectors = centroids[spk] + 0.8 * rng.standard_normal((n, dim), dtype=np.float32)
        np.save(tmp / f"{name}.npy", vectors)
        (tmp / f"{name}.ids").write_text("\n".join(ids) + "\n")
        import_vectors(tmp / f"{name}.npy", tmp / name, ids_file=tmp / f"{name}.ids", shard_size=4096)
        return ids, spk

    ids, spk = cache("test", utts, 0)
    cache("train", 40 * 50, 5000)
    run = fit(tmp / "train", (64, 128, 256), tmp / "run", epochs=1, batch_size=256, val_speakers=0, head_only=True,
              progress=False)
    e, t = rng.integers(0, utts, trials), rng.integers(0, utts, trials)
    (tmp / "trials.txt").write_text("".join(f"{int(spk[a] == spk[b])} {ids[a]} {ids[b]}\n" for a, b in zip(e, t)))
    return run / "model.pt", tmp / "trials.txt", tmp / "test"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", default=["."], help="source trees to time (each first on PYTHONPATH)")
    ap.add_argument("--utts", type=int, default=145_000)
    ap.add_argument("--trials", type=int, default=550_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--material", type=Path, default=None,
                    help="folder to build the material in and keep (reused when it holds it already)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        where = (args.material or Path(tmp)).resolve()
        if (where / "trials.txt").is_file():
            model, trials, cache = where / "run" / "model.pt", where / "trials.txt", where / "test"
            print(f"material of {where} reused (built with its own --utts, --dim, --trials)", end="; ")
        else:
            where.mkdir(parents=True, exist_ok=True)
            model, trials, cache = build(where, args.utts, args.dim, args.trials)
            print(f"built in {time.perf_counter() - tick:.0f} s: {args.utts} utterances x {args.dim} (float16), "
                  f"{args.trials} trials", end="; ")
        print(f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        for tree in args.trees:  # each tree must time its own code
            root = Path(tree).resolve()
            found = subprocess.run([sys.executable, "-c", "import mrlcache; print(mrlcache.__file__)"], cwd=root,
                                   env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True)
            if not found.stdout.strip().startswith(str(root)):
                sys.exit(f"{tree}: python -m mrlcache would run {found.stdout.strip() or found.stderr[-300:]}")
        print("| tree | round | wall s | CPU s (user+sys) | load before |\n|---|---|---|---|---|")
        for r in range(args.rounds):
            for tree in args.trees:
                # Run in the tree: ``python -m`` puts the working folder first on sys.path, so
                # from anywhere else it would shadow PYTHONPATH (before session 7 every tree
                # timed the code of the folder the bench was started in).
                root = Path(tree).resolve()
                env = dict(os.environ, PYTHONPATH=str(root))
                load = os.getloadavg()[0]
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                tick = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "mrlcache", "eer", "--model", str(model), "--trials",
                                      str(trials), "--cache", str(cache)], env=env, cwd=root, capture_output=True,
                                     text=True)
                wall = time.perf_counter() - tick
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                print(f"| {tree} | {r} | {wall:.1f} | {cpu:.1f} | {load:.1f} |", flush=True)
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
