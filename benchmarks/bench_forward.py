"""Backbone forward against the machine's matmul rate, every engine side by side in one run.

    python benchmarks/bench_forward.py                       # b2, batch 8 x 2 s, 2 threads, 3 rounds
    python benchmarks/bench_forward.py --variants b0 b2 --threads 1 --rounds 5 --startup

Contenders, interleaved round by round so that a shared machine's load hits them alike:
``ReDimNet.pooled`` as loaded (torch), its frozen inference copy (``for_inference``:
BatchNorm folded, channels-last, small-group convolutions in mrlcache's kernel), the same copy
with oneDNN's convolutions instead of the kernel (``--onednn-convs``: as before session 9), and
the onnxruntime engine (spinning threads and not).
Each round also times a float32 matmul (512 x 1024 @ 1024 x 1024) as the attainable rate.
FLOPs of the forward are counted by ``torch.utils.flop_counter`` (convolutions and
matmuls). Reported: best-of-rounds wall and CPU (process) time, GFLOP/s and the fraction
of the matmul rate, in wall and in CPU time (CPU time is what a loaded machine distorts
least). The process's glibc allocator is set as ``extract``, ``embed`` and ``verify`` set it
(:func:`mrlcache.runtime.reuse_large_allocations`), unless ``--glibc-default``: it is
process-wide, so compare the two settings by running the script twice, alternately. ``--startup`` times creating the onnxruntime engine twice: the first exports it
(or reuses a file from an earlier run), the second reads the cached file.

    python benchmarks/bench_forward.py --variants b2 --graphs --no-onnx --rounds 3

``--graphs`` adds whole-graph forms of the fused copy (each checked within 1e-5 of torch first):
TorchScript traced and frozen; the same after ``torch.jit.optimize_for_inference``; oneDNN Graph
fusion (``torch.jit.enable_onednn_fusion``) on it; and onnxruntime on the fused graph (its
exportable mel front end, then the folded channels-last network; exported by the dynamo exporter
at start, about a minute). A form that fails is reported in one line and left out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mrlcache.backbone import gconv
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


class _FusedPooled(torch.nn.Module):
    """wave -> pooled of a fused copy (``for_inference``), behind a given front end."""

    def __init__(self, fused, features):
        super().__init__()
        self.fused, self.features = fused, features

    def forward(self, wave):
        return self.fused.pool(self.fused.net(self.features(wave)))


def graph_contenders(model, wave, threads: int, onnx: bool = True) -> dict:
    """``--graphs``: label -> pooled callable, for each whole-graph form of the fused copy that runs
    within 1e-5 (relative to the largest value) of ``model.pooled``; the others are printed
    (``onnx`` False: without onnxruntime on the fused graph)."""
    fused = model.for_inference()
    with torch.inference_mode():
        want = model.pooled(wave)

    def traced():
        with torch.no_grad():
            return torch.jit.freeze(torch.jit.trace(_FusedPooled(fused, fused.features).eval(), wave, check_trace=False))

    def onednn():
        torch.jit.enable_onednn_fusion(True)
        try:
            graph = traced()
            with torch.no_grad():
                for _ in range(3):  # the profiling runs that let it fuse
                    graph(wave)
            return graph
        finally:
            torch.jit.enable_onednn_fusion(False)

    def onnx_fused():
        import io

        import onnxruntime as ort

        from mrlcache.export import onnx

        front = model.exportable()
        net = _FusedPooled(fused, front.frontend).eval()
        with torch.no_grad():
            data = onnx.write(net, (torch.randn(2, 16000),), ["wave"], [{0: ("batch", 1), 1: ("samples", front.min_samples)}],
                              {"dims": [model.pooled_dim]}, None)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(io.BytesIO(data).getvalue(), options, providers=["CPUExecutionProvider"])
        return lambda w: torch.from_numpy(session.run(None, {"wave": w.numpy()})[0])

    makers = {"fused traced+frozen": traced,
              "fused optimize_for_inference": lambda: torch.jit.optimize_for_inference(traced()),
              "fused oneDNN Graph": onednn, **({"onnxruntime on fused (no spinning)": onnx_fused} if onnx else {})}
    out = {}
    for label, make in makers.items():
        try:
            fn = make()
            with torch.inference_mode():
                err = float((fn(wave) - want).abs().max() / want.abs().max())
        except Exception as exc:  # noqa: BLE001 - a form that does not run is a result, reported
            print(f"{label}: fails ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]})")
            continue
        print(f"{label}: largest difference from torch {err:.1e} of the largest value")
        if err <= 1e-5:
            out[label] = fn
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["b2"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-onnx", dest="onnx", action="store_false")
    ap.add_argument("--startup", action="store_true", help="time the onnxruntime engine's creation, cold and cached")
    ap.add_argument("--graphs", action="store_true", help="add whole-graph forms of the fused copy (see above)")
    ap.add_argument("--onednn-convs", action="store_true",
                    help="add the fused copy with oneDNN's small-group convolutions (the kernel off)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="keep glibc's allocator defaults (fresh pages for every large activation)")
    args = ap.parse_args()
    allocator = "glibc defaults" if args.glibc_default else "heap reuse (as the commands)"
    if not args.glibc_default:
        reuse_large_allocations()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.crop:g} s, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}, allocator: {allocator}, load average {os.getloadavg()[0]:.1f} "
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
        if args.onednn_convs:
            with gconv.off():
                contenders["for_inference, oneDNN convolutions"] = model.for_inference().pooled
        if args.graphs:
            contenders.update(graph_contenders(model, wave, args.threads, args.onnx))
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
