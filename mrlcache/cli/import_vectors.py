"""``mrlcache import-vectors``: embeddings from another toolkit into a regular cache."""

from pathlib import Path

import click

from mrlcache import names
from mrlcache.cli.options import COUNT
from mrlcache.config import config_option, write_resolved


@click.command("import-vectors")
@config_option
@click.option("--vectors", required=True, type=click.Path(exists=True),
              help=".npy, .npz, .pt/.pth, Kaldi .ark/.scp, or a folder of one .npy per utterance.")
@click.option("--ids", "ids_file", type=click.Path(exists=True, dir_okay=False),
              help="Utterance ids, one per line, in row order (.npy input; default X.ids.txt beside X.npy).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to write.")
@click.option("--utt2spk", type=click.Path(exists=True, dir_okay=False),
              help="Kaldi utt2spk naming every utterance's speaker [default: the file's labels, "
                   "else the first path component of VoxCeleb-style ids].")
@click.option("--name", help="What the vectors are, recorded in cache.json [default: the input's name].")
@click.option("--layout", type=click.Choice(names.LAYOUTS),
              help="What K is in (N, K, D) input: crops of each utterance (views), or backbone layers (the layers stream, for fit --inputs layers).")
@click.option("--dtype", type=click.Choice(names.DTYPES), default="float16", show_default=True)
@click.option("--shard-size", type=COUNT, default=1000, show_default=True, help="Utterances per shard.")
@click.option("--format", "backend", type=click.Choice(names.BACKENDS), default=names.BACKENDS[0], show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at --out.")
@click.pass_context
def import_vectors(ctx, vectors, ids_file, out, utt2spk, name, layout, dtype, shard_size, backend, overwrite):
    """Write a cache from vectors computed outside mrlcache: stream 'pooled', or 'layers' for layer stacks."""
    from mrlcache.cache import CacheError
    from mrlcache.interop import InteropError
    from mrlcache.interop import import_vectors as run

    try:
        summary = run(vectors, out, ids_file=ids_file, utt2spk=utt2spk, name=name, layout=layout,
                      dtype=dtype, shard_size=shard_size, backend=backend, overwrite=overwrite)
    except (InteropError, CacheError) as err:
        raise click.ClickException(str(err)) from None
    write_resolved(ctx, Path(out) / "import-config.yaml")
    click.echo(f"{summary['utterances']} vectors in {summary['shards']} shards -> {out}", err=True)
