"""CPU throughput of an exported model in onnxruntime against PyTorch (audio seconds per second).

    python benchmarks/bench_export.py                       # b0 and b2, 2 threads, ~2 minutes
    python benchmarks/bench_export.py --variants b2 --seconds 2 8 --threads 1

Random weights (speed does not depend on their values) and a head of dims 64..256. For each
variant it exports the whole model to ONNX once, then times one utterance at a time, for
each length: PyTorch as ``mrlcache embed`` runs it (MelBanks front end), PyTorch with the
exportable front end (:class:`mrlcache.export.ExportableModel`), and onnxruntime on the
exported file. Prints a markdown table. Run by hand on an idle machine; never a test. With
OMP_WAIT_POLICY=PASSIVE (a shared machine) onnxruntime's threads do not spin either.
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def throughput(run, wave, min_time):
    """Audio seconds per wall second of run(wave), repeated for >= min_time after a warm-up."""
    run(wave)
    rounds, start = 0, time.perf_counter()
    while True:
        run(wave)
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return rounds * wave.shape[-1] / 16000 / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["b0", "b2"])
    parser.add_argument("--seconds", nargs="+", type=float, default=[2.0, 6.0, 12.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds timed per cell")
    args = parser.parse_args()

    import onnxruntime as ort

    from mrlcache.export import ExportableModel, export_model
    from mrlcache.models.matryoshka import MatryoshkaHead
    from mrlcache.models.model import MRLModel
    from mrlcache.backbone import load_backbone

    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        # The same rule for both engines: no spinning threads on a shared machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| variant | seconds | torch (MelBanks) | torch (exportable front end) | onnxruntime | ort / torch |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        torch.manual_seed(0)
        backbone = load_backbone(variant, random_init=True)
        model = MRLModel(backbone, MatryoshkaHead(backbone.pooled_dim, [64, 128, 192, 256])).eval()
        exportable = ExportableModel(model, 256).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = export_model(model, Path(tmp) / "model.onnx")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for seconds in args.seconds:
            wave = torch.randn(1, int(seconds * 16000)) * 0.1
            with torch.inference_mode():
                eager = throughput(lambda w: model.embed_all(w), wave, args.min_time)
                folded = throughput(exportable, wave, args.min_time)
            onnx = throughput(lambda w: session.run(None, {"wave": w}), wave.numpy(), args.min_time)
            print(f"| {variant} | {seconds:g} | {eager:.0f} | {folded:.0f} | {onnx:.0f} | {onnx / eager:.2f} |")


if __name__ == "__main__":
    main()
