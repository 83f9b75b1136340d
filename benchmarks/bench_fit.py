"""Speed of head fitting on the cache versus end-to-end training with a frozen backbone.

Run by hand (minutes):  python benchmarks/bench_fit.py [--variant b2] [--classes 5994] [--class-sample 0.5]

Cache mode: a synthetic cache of ``--utts`` utterances x 4 views at the variant's pooled
size (2304 for b2), ``--classes`` speakers (the head cost is mostly the class scores, so
VoxCeleb2's 5994 is the realistic setting), batch 256, dims 64/128/192/256; float32 and
bf16 autocast. End-to-end mode: the same variant (random weights: same cost as the
published ones), frozen, on ``--e2e-utts`` synthetic utterances with 2 s crops and the
same head and loss. ``--class-sample R`` adds float32 cache runs whose softmax covers a
share R of the classes per step (``mrlcache fit --class-sample``). Reports seconds/epoch, samples/s, the ratio, and the extrapolated
time of 1,000,000 utterances x 30 epochs of cache fitting.

``--breakdown`` instead times the phases of one head step at that geometry (median over
``--steps`` steps, seconds): head forward, loss forward, backward, clipping + optimiser.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def synthetic_cache(out: Path, utts: int, classes: int, dim: int, views: int = 4) -> None:
    from mrlcache import cache
    from mrlcache.corpus import Utterance

    rng = np.random.default_rng(0)
    manifest = [Utterance(f"id{i % classes:05d}/v/{i:07d}.wav", "-", f"id{i % classes:05d}") for i in range(utts)]
    meta = {"model_config": {}, "weights_sha256": "0" * 64, "pooled_dim": dim, "sample_rate": 16000,
            "mode": "train", "crop_seconds": 2.0, "views": views, "augment": {}, "seed": 0,
            "dtype": "float16", "shard_size": 2048}
    with cache.CacheWriter(out, meta, manifest) as writer:
        for k in range(writer.num_shards):
            rows = list(writer.shard_rows(k))
            writer.write_shard(k, rows, rng.standard_normal((len(rows), views, dim), np.float32), {}, 0.0)
        writer.finish()


def step_breakdown(pooled_dim: int, classes: int, precision: str, steps: int, class_sample: float = 1.0) -> dict:
    """Median milliseconds per phase of a training step (batch 256, dims 64..256, AAM)."""
    from mrlcache.fit import FitConfig
    from mrlcache.models.matryoshka import MatryoshkaHead
    from mrlcache.fit.losses import MatryoshkaMarginLoss, sample_classes
    from mrlcache.fit.optim import make_optimizer, param_groups

    torch.manual_seed(0)
    dims = (64, 128, 192, 256)
    head, loss_fn = MatryoshkaHead(pooled_dim, dims), MatryoshkaMarginLoss(dims, classes)
    cfg = FitConfig()  # the defaults (nested: cfg.optim.lr...)
    opt = make_optimizer(cfg, param_groups([head, loss_fn], cfg))
    params = [p for g in opt.param_groups for p in g["params"]]
    x, y = torch.randn(256, pooled_dim), torch.randint(0, classes, (256,))
    dtype = torch.bfloat16 if precision == "bf16" else None
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 3):  # 3 warm-up steps
        t = [time.perf_counter()]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            emb = head(x)
            t.append(time.perf_counter())
            kept = sample_classes(y, classes, class_sample, gen) if class_sample < 1 else None
            loss = loss_fn(emb, y, kept)[0]
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if step >= 3:
            times.append(np.diff(t))
    med = np.median(np.array(times), axis=0) * 1000
    total = float(np.median(np.array(times).sum(1)) * 1000)
    names = ("head forward", "loss forward", "backward", "clip + optimiser")
    return {**dict(zip(names, med.tolist())), "step": total}


def history(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="b2")
    ap.add_argument("--utts", type=int, default=16384)
    ap.add_argument("--classes", type=int, default=5994)
    ap.add_argument("--e2e-utts", type=int, default=48)
    ap.add_argument("--e2e-batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--breakdown", action="store_true", help="only time the phases of one head step")
    ap.add_argument("--steps", type=int, default=30, help="steps timed by --breakdown")
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="fit's feature memory budget; below the cache's size (e.g. 0.05) the features are streamed")
    ap.add_argument("--class-sample", type=float, action="append", default=[],
                    help="also run fp32 with this share of classes per step (repeatable)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from conftest import make_tree

    from mrlcache.fit import fit, fit_end_to_end
    from mrlcache.backbone.loading import load_backbone

    dims = (64, 128, 192, 256)
    pooled_dim = load_backbone(args.variant, random_init=True).pooled_dim
    modes = [("fp32", 1.0), ("bf16", 1.0)] + [("fp32", r) for r in args.class_sample]
    if args.breakdown:
        for precision, rate in modes:
            b = step_breakdown(pooled_dim, args.classes, precision, args.steps, rate)
            step = b.pop("step")
            print(f"step {precision}, class sample {rate:g}: {step:.1f} ms ({256000 / step:.0f} samples/s) = "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in b.items()), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_cache(tmp / "cache", args.utts, args.classes, pooled_dim)
        for precision, rate in modes:
            run = fit(tmp / "cache", dims, tmp / f"cache-{precision}-{rate}", epochs=args.epochs, batch_size=256,
                      val_speakers=0, head_only=True, progress=False, precision=precision, class_sample=rate,
                      memory_gb=args.memory_gb)
            h = history(run)[-1]  # the last epoch: warm caches, steady state
            features = json.loads((run / "fingerprint.json").read_text())["features"]
            name = f"cache {precision}" + (f" classes {rate:g}" if rate < 1 else "") + f" ({features})"
            results[name] = (h["seconds"], h["samples_per_s"])
        make_tree(tmp / "audio", speakers=args.e2e_utts // 4, videos=2, utts=2, seconds=3.0)
        run = fit_end_to_end(tmp / "audio", dims, tmp / "e2e", variant=args.variant, random_init=True,
                             crop_seconds=2.0, views=1, epochs=1, batch_size=args.e2e_batch, val_speakers=0,
                             workers=0, progress=False)
        h = history(run)[-1]
        results["end-to-end frozen"] = (h["seconds"], h["samples_per_s"])

    e2e = results["end-to-end frozen"][1]
    print(f"threads {torch.get_num_threads()}, variant {args.variant} (pooled {pooled_dim}), "
          f"{args.classes} classes, dims {dims}")
    print(f"{'mode':<35} {'s/epoch':>9} {'samples/s':>10} {'x e2e':>7} {'1M x 30 epochs':>15}")
    for name, (sec, sps) in results.items():
        total_h = 1_000_000 * 30 / sps / 3600
        print(f"{name:<35} {sec:>9.2f} {sps:>10.0f} {sps / e2e:>7.0f} {total_h:>13.2f} h")


if __name__ == "__main__":
    main()
