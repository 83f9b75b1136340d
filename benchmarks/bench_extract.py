"""Extraction throughput against the bare forward of the same engine, every engine in one run.

    python benchmarks/bench_extract.py --variant b2 --engines torch fused onnxruntime --rounds 3

Over one synthetic corpus and the same crops, per engine and round (engines interleaved round
by round, so that a shared machine's load hits them alike):

1. bare forward: every crop decoded and made beforehand, only the engine's ``pooled`` timed,
   in the batches extract uses (the ceiling: what the model alone can do);
2. ``mrlcache.extract.extract`` with that engine: workers decode and augment while the model
   runs, shards written. ``loop`` is the pass itself (the summary's ``elapsed_seconds``);
   ``call`` adds everything before it (cache set-up, the engine's creation: for onnxruntime
   the cached file read and checked, for fused the folded copy).

The extract/bare ratio splits into two factors: ``forward`` (the bare time over the time the
model spent in its forward inside extract: how much the decoding workers and the rest slowed
the forward itself) and ``busy`` (the model's busy fraction: time waiting for batches or
writing). Ratios are per round (median of rounds reported); wall seconds are best of rounds.
``ratio (CPU)`` is the bare forward's CPU time over extract's (this process's threads and the
ended workers'): what a loaded machine distorts least, it counts the work extract adds
(decoding, augmentation, writing) but not time lost to waiting.

    python benchmarks/bench_extract.py --variant b2 --engines torch fused onnxruntime --nices 19 0 --rounds 3

``--nices`` runs extract once per decoding-worker niceness (``mrlcache.extract.data.WORKER_NICE``,
19 by default; 0 was extract before session 8), interleaved round by round, one row each.

    python benchmarks/bench_extract.py --eval --variant b0 --engines torch --rounds 3

``--eval`` instead times eval mode (whole utterances), ``--eval-batch bucket`` against
``single``, interleaved round by round, on a corpus whose lengths repeat: each synthetic
utterance is cut to a whole number of ``--quantum`` samples (a multiple of 1024, as VoxCeleb2's
AAC frames), so ``--utterances`` per speaker share a few lengths. Per mode: extract's wall
and CPU seconds (best of rounds), the forwards run, and the largest difference from
``single``'s vectors (float32 cache).
"""

import argparse
import os
import resource
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mrlcache.cache  # noqa: E402
import mrlcache.extract.data  # noqa: E402
from mrlcache.audio import load_audio  # noqa: E402
from mrlcache.augment import AugmentConfig, Augmenter, make_view  # noqa: E402
from mrlcache.backbone.loading import load_backbone  # noqa: E402
from mrlcache.corpus import scan_tree  # noqa: E402
from mrlcache.demo.synth import make_corpus  # noqa: E402
from mrlcache.extract import ExtractConfig, extract, shard_batches  # noqa: E402
from mrlcache.runtime import reuse_large_allocations  # noqa: E402


def _workers(args) -> int:
    """The decoding workers extract runs with: ``--workers``, else extract's own default."""
    from mrlcache.extract.run import default_workers

    return default_workers(torch.device("cpu")) if args.workers is None else args.workers


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its ended children (the decoding workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def bare_forward(engine: str, model, threads: int):
    """The ``pooled`` callable ``extract --engine ENGINE`` runs (with decoding workers)."""
    if engine == "fused":
        return model.for_inference().pooled
    if engine == "onnxruntime":
        from mrlcache.export.engine import OnnxBackbone

        return OnnxBackbone(model, threads=threads, spin=False).pooled  # as extract makes it with workers
    return model.pooled


def eval_rounds(args, tmp: Path) -> None:
    """``--eval``: eval-mode extraction and its bare forward, bucketed against one utterance a forward."""
    import soundfile as sf

    from mrlcache.extract.buckets import EvalBuckets

    make_corpus(tmp / "corpus", speakers=args.speakers, utterances=args.utterances, seed=0, test_speakers=2,
                seconds=(args.eval_seconds[0], args.eval_seconds[1] + args.quantum / 16000))
    for path in sorted((tmp / "corpus").rglob("*.wav")):  # each cut to whole quanta: lengths repeat
        wave, rate = sf.read(path, dtype="int16")
        sf.write(path, wave[: len(wave) // args.quantum * args.quantum], rate, subtype="PCM_16")
    utts = scan_tree(tmp / "corpus" / "train")
    waves = [type("Item", (), {"views": load_audio(u.path)[None]}) for u in utts]
    audio = sum(w.views.shape[-1] for w in waves) / 16000
    model = load_backbone(args.variant, random_init=True, seed=0).eval()
    model.weights_sha256 = "benchmark"
    modes = ("bucket", "single")
    groups = {}  # the batches extract runs (one shard): decoded beforehand for the bare forward
    for mode in modes:
        buckets = EvalBuckets(args.batch_size if mode == "bucket" else 1, None)
        groups[mode] = [np.concatenate([it.views for it in g]) for g in buckets.add(0, waves) + buckets.finish(0)]
    forwards = {e: bare_forward(e, model, args.threads) for e in args.engines}
    with torch.inference_mode():
        for fn in forwards.values():
            fn(torch.from_numpy(groups["bucket"][0]))  # warm-up
    runs = {(e, m): [] for e in args.engines for m in modes}
    vectors = {}
    for r in range(args.rounds):
        for engine in args.engines:
            for mode in modes if r % 2 == 0 else modes[::-1]:
                with torch.inference_mode():
                    tick, cpu = time.perf_counter(), cpu_seconds()
                    for batch in groups[mode]:
                        forwards[engine](torch.from_numpy(batch))
                    bare, bare_cpu = time.perf_counter() - tick, cpu_seconds() - cpu
                cfg = ExtractConfig.of(mode="eval", batch_size=args.batch_size, workers=args.workers, dtype="float32",
                                       shard_size=len(utts), device="cpu", precision="fp32", engine=engine,
                                       eval_batch=mode)
                tick, cpu = time.perf_counter(), cpu_seconds()
                extract(utts, model, tmp / "cache", cfg, overwrite=True, progress=False)
                wall, used = time.perf_counter() - tick, cpu_seconds() - cpu
                vectors[engine, mode] = mrlcache.cache.open(tmp / "cache").read("pooled", view=0)
                runs[engine, mode].append({"bare": bare, "bare_cpu": bare_cpu, "wall": wall, "cpu": used})
                print(f"round {r + 1} {engine} {mode}: bare {bare:.2f} s (CPU {bare_cpu:.2f} s), extract {wall:.2f} s "
                      f"(CPU {used:.2f} s)", flush=True)
    print(f"\n# {args.variant}, eval, {len(utts)} utts, {audio:.0f} s audio, "
          f"{len({w.views.shape[-1] for w in waves})} distinct lengths (quantum {args.quantum} samples), batch "
          f"{args.batch_size}, {_workers(args)} workers, {args.rounds} rounds, load average {os.getloadavg()[0]:.1f} "
          f"at the end; best of rounds, ratios: single's time over this one's (median of rounds)")
    keys = ("bare", "bare_cpu", "wall", "cpu")
    print("| engine | eval batch | forwards | bare s | bare CPU s | extract s | extract CPU s | bare | bare CPU "
          "| extract | extract CPU | max rel. diff vs single |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for engine in args.engines:
        for mode in modes:
            rows, base = runs[engine, mode], runs[engine, "single"]
            best = [min(x[k] for x in rows) for k in keys]
            ratios = [statistics.median(b[k] / x[k] for x, b in zip(rows, base)) for k in keys]
            a, b = vectors[engine, mode], vectors[engine, "single"]
            diff = float(np.abs(a - b).max() / np.abs(b).max())
            print(f"| {engine} | {mode} | {len(groups[mode])} | " + " | ".join(f"{v:.2f}" for v in best + ratios)
                  + f" | {diff:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="b2")
    parser.add_argument("--engines", nargs="+", default=["torch", "fused", "onnxruntime"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speakers", type=int, default=8)
    parser.add_argument("--utterances", type=int, default=6)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--crop-seconds", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default: extract's own rule)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--nices", type=int, nargs="+", default=[mrlcache.extract.data.WORKER_NICE],
                        help="decoding-worker niceness per contender (extract's WORKER_NICE)")
    parser.add_argument("--eval", action="store_true", help="time eval mode: --eval-batch bucket against single")
    parser.add_argument("--eval-seconds", type=float, nargs=2, default=(2.0, 6.0), help="--eval: length range")
    parser.add_argument("--quantum", type=int, default=16384, help="--eval: lengths are multiples of this")
    args = parser.parse_args()
    reuse_large_allocations()  # as the extract command does
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} model threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average "
          f"{os.getloadavg()[0]:.1f} at start, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")

    if args.eval:
        with tempfile.TemporaryDirectory() as tmp:
            eval_rounds(args, Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_corpus(tmp / "corpus", speakers=args.speakers, utterances=args.utterances, seed=0, test_speakers=2)
        utts = scan_tree(tmp / "corpus" / "train")
        model = load_backbone(args.variant, random_init=True, seed=0).eval()
        model.weights_sha256 = "benchmark"
        crop = int(round(args.crop_seconds * 16000))
        augmenter = Augmenter(AugmentConfig())
        crops = [np.stack([make_view(load_audio(u.path), u.utt_id, v, seed=0, crop_samples=crop, augmenter=augmenter)
                           for v in range(args.views)]) for u in utts]
        # extract's own batches: per shard (shard_size below), never crossing a shard's end
        shard_size, rows = max(1, len(utts) // 2), range(len(utts))
        shards = [rows[k : k + shard_size] for k in range(0, len(rows), shard_size)]
        batches = [np.concatenate([crops[r] for r in rows])
                   for rows in (b for s in shards for b in shard_batches(s, max(1, args.batch_size // args.views)))]
        crop_audio = len(utts) * args.views * args.crop_seconds
        forwards = {e: bare_forward(e, model, args.threads) for e in args.engines}
        runs = {(e, n): [] for e in args.engines for n in args.nices}
        for r in range(args.rounds):
            for engine in args.engines:
                fn = forwards[engine]
                with torch.inference_mode():
                    fn(torch.from_numpy(batches[0]))  # warm-up
                    tick, cpu = time.perf_counter(), cpu_seconds()
                    for batch in batches:
                        fn(torch.from_numpy(batch))
                    bare, bare_cpu = time.perf_counter() - tick, cpu_seconds() - cpu
                cfg = ExtractConfig.of(views=args.views, crop_seconds=args.crop_seconds, batch_size=args.batch_size,
                                    workers=args.workers, shard_size=shard_size, device="cpu",
                                    precision="fp32", engine=engine)
                for nice in args.nices if r % 2 == 0 else args.nices[::-1]:
                    mrlcache.extract.data.WORKER_NICE = nice  # read when extract forks its workers
                    tick, cpu = time.perf_counter(), cpu_seconds()
                    summary = extract(utts, model, tmp / f"cache-{engine}", cfg, overwrite=True, progress=False)
                    call, call_cpu = time.perf_counter() - tick, cpu_seconds() - cpu
                    loop = summary["elapsed_seconds"]
                    busy = summary["model_busy_fraction"]
                    runs[engine, nice].append({"bare": bare, "loop": loop, "call": call, "busy": busy,
                                               "forward": bare / (busy * loop), "cpu": bare_cpu / call_cpu})
                    print(f"round {r + 1} {engine} nice {nice}: bare {bare:.2f} s, loop {loop:.2f} s "
                          f"({bare / loop:.2f}), call {call:.2f} s, busy {busy:.2f}, CPU bare {bare_cpu:.2f} s, "
                          f"call {call_cpu:.2f} s", flush=True)

    print(f"\n# {args.variant}, {len(utts)} utts x {args.views} views x {args.crop_seconds:g} s, batch "
          f"{args.batch_size}, {_workers(args)} workers, {args.rounds} rounds, load average {os.getloadavg()[0]:.1f} "
          f"at the end")
    print("| engine | worker nice | bare s | extract loop s | extract call s | crop audio s/s (bare) | ratio (loop) "
          "| ratio (call) | forward | busy | ratio (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (engine, nice), rows in runs.items():
        best = {k: min(x[k] for x in rows) for k in ("bare", "loop", "call")}
        med = {k: statistics.median(x[k] for x in rows) for k in ("busy", "forward", "cpu")}
        loop_ratio = statistics.median(x["bare"] / x["loop"] for x in rows)
        call_ratio = statistics.median(x["bare"] / x["call"] for x in rows)
        print(f"| {engine} | {nice} | {best['bare']:.2f} | {best['loop']:.2f} | {best['call']:.2f} "
              f"| {crop_audio / best['bare']:.1f} | {loop_ratio:.2f} | {call_ratio:.2f} | {med['forward']:.2f} "
              f"| {med['busy']:.2f} | {med['cpu']:.2f} |")


if __name__ == "__main__":
    main()
