"""``mrlcache check``: is a cache sound? Prints OK, or one line per problem and exits 1."""

from pathlib import Path

import click

from mrlcache.config import config_option


@click.command()
@click.argument("cache_dir", metavar="CACHE", type=click.Path(path_type=Path))
@click.option(
    "--full",
    is_flag=True,
    help="Also recompute every shard's checksums (reads every vector once); "
    "without it, only structure and sizes are checked (no vector is read).",
)
@config_option
def check(cache_dir: Path, full: bool):
    """Check the cache CACHE: cache.json, manifest.tsv, every shard, the summary.

    Exit status 0 when sound, 1 when something is damaged or missing; each problem names
    the file and the fix (usually: rerun the same 'mrlcache extract' command).
    """
    from mrlcache.cache import read_meta
    from mrlcache.cache.reader import problems

    found = problems(cache_dir, full=full)
    if not found:
        what = "structure, sizes and checksums" if full else "structure and sizes (--full also checks checksums)"
        if full and read_meta(cache_dir)["format_version"] < 2:
            what = "structure and sizes (a format-1 cache records no checksums)"
        click.echo(f"OK {cache_dir}: {what}")
        return
    for line in found:
        click.echo(line)
    raise SystemExit(1)
