"""The ``mrlcache`` command line: a click group with one module per command.

Each command module keeps its heavy imports (torch, zarr, ...) inside the command body so
that ``mrlcache --help`` answers at once.
"""

import os

import click

from mrlcache import __version__


def passive_openmp():
    """Let OpenMP threads sleep between parallel regions; call before torch is imported.

    For commands whose decoding workers share the cores with the model: busy-waiting
    model threads starved them (b2 ran 9x slower on 2 cores under load). Commands without
    workers keep OpenMP's default, which is faster alone (a fit step: 47 -> 39 ms). A value
    the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mrlcache")
def main():
    """Matryoshka speaker embeddings from a frozen ReDimNet, feature-cache-first.

    Typical flow: extract (once) -> fit (minutes) -> eer.
    """


def _register():
    # One line per command module; a module that fails to import is a bug, not something
    # to hide, so there is no try/except here.
    from mrlcache.cli import eer, embed, extract, info
    from mrlcache.cli import demo, fit
    from mrlcache.cli import corpus
    from mrlcache.cli import calibrate
    from mrlcache.cli import verify

    main.add_command(info.info)
    main.add_command(extract.extract)
    main.add_command(eer.eer)
    main.add_command(embed.embed)
    main.add_command(fit.fit)
    main.add_command(demo.demo)
    main.add_command(corpus.make_corpus)
    main.add_command(calibrate.calibrate)
    main.add_command(verify.verify)


_register()
