"""``mrlcache export``: a fitted model as an ONNX or TorchScript file, optionally verified.

The file maps a wave (B, T) float32 at 16 kHz (dynamic B and T) to ``embedding``
(B, max(dims)); the d-dimensional embedding is its first d columns, raw (L2-normalise
before cosine scoring). Every model fit writes exports (pooled, stream models with any
fusion, ECAPA-TDNN); head-only models take what they were fitted on (``pooled`` vectors, or
one input per cached stream); a stream with no exportable front end (f0, a pretrained
transformer's layers) is refused in one line. See :mod:`mrlcache.export`.
"""

from __future__ import annotations

import click

from mrlcache import names, ranges
from mrlcache.cli.options import DIMS, Number

OPSET = Number(ranges.OPSET)


@click.command("export")
@click.argument("model_path", metavar="RUN/model.pt", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(names.EXPORT_FORMATS),
              help="onnx (run with onnxruntime) or torchscript (torch.jit.load).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write, e.g. model.onnx.")
@click.option("--dims", type=DIMS, default=None, help="Sizes to export, comma-separated (default every trained size).")
@click.option("--opset", type=OPSET, default=None, help="ONNX opset (default 18).")
@click.option("--verify", is_flag=True,
              help="Run the file against the PyTorch model at two lengths, two batch sizes and every dim "
                   "(relative error <= 1e-4, else exit 1).")
def export(model_path, fmt, out, dims, opset, verify):
    """Write RUN/model.pt as an ONNX or TorchScript file."""
    from mrlcache.export import TOLERANCE, ExportError, export_model, verify_export
    from mrlcache.models.model import ModelError, load_model

    dims_t = None if dims is None else list(dims)
    if opset is not None and fmt != "onnx":
        raise click.BadParameter("only ONNX files have an opset; drop --opset for torchscript", param_hint="--opset")
    from mrlcache.paths import check_output

    check_output(out, [model_path])
    try:
        model = load_model(model_path)
        path = export_model(model, out, format=fmt, dims=dims_t, opset=opset)
        click.echo(f"wrote {path}")
        if verify:
            report = verify_export(path, model, dims=dims_t)
            verdict = "passed" if report["passed"] else "FAILED"
            click.echo(f"verify: max relative error {report['max_rel_error']:.2e} over lengths, batch sizes "
                       f"and dims ({verdict}, tolerance {TOLERANCE:.0e})")
            if not report["passed"]:
                raise SystemExit(1)
    except (ModelError, ExportError) as err:
        raise click.ClickException(str(err)) from None
