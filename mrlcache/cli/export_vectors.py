"""``mrlcache export-vectors``: cached vectors (raw, or through a fitted head) for other toolkits."""

import click

from mrlcache import names
from mrlcache.cli.options import COUNT, WORKERS, verify_option
from mrlcache.config import config_option


@click.command("export-vectors")
@config_option
@verify_option
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False),
              help="RUN/model.pt from 'mrlcache fit' [default: the raw cached vectors].")
@click.option("--dim", type=COUNT, default=None, help="Embedding size [default: the model's largest].")
@click.option("--format", "fmt", type=click.Choice(names.VECTOR_FORMATS), required=True,
              help="kaldi: OUT.ark + OUT.scp; npz: ids + vectors; npy: OUT.npy + OUT.ids.txt, or a folder.")
@click.option("--out", required=True, type=click.Path(), help="Output path (see --format).")
@click.option("--view", type=WORKERS, default=0, show_default=True, help="Which cached view to export.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def export_vectors(cache, model_path, dim, fmt, out, view, overwrite):
    """Write the vectors of CACHE (no audio pass) as Kaldi ark+scp, .npz or .npy."""
    from mrlcache.cache import CacheError
    from mrlcache.interop import InteropError
    from mrlcache.interop import export_vectors as collect
    from mrlcache.interop import write_vectors
    from mrlcache.models.model import ModelError, load_model

    from mrlcache.interop import output_paths
    from mrlcache.paths import check_output

    for path in output_paths(fmt, out):
        check_output(path, [cache, model_path], folder=fmt == "npy" and path.suffix != ".npy")
    try:
        model = None if model_path is None else load_model(model_path)
        ids, vectors, speakers = collect(cache, model=model, dim=dim, view=view)
        written = write_vectors(ids, vectors, fmt, out, speakers=speakers, overwrite=overwrite)
    except (InteropError, CacheError, ModelError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{len(ids)} vectors of dim {vectors.shape[1]} -> {', '.join(map(str, written))}", err=True)
