"""The ``mrlcache`` command line: a click group with one module per command.

Each command module keeps its heavy imports (torch, zarr, ...) inside the command body so
that ``mrlcache --help`` answers at once.
"""

import click

from mrlcache import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mrlcache")
def main():
    """Matryoshka speaker embeddings from a frozen ReDimNet, feature-cache-first.

    Typical flow: extract (once) -> fit (minutes) -> eer.
    """


def __getattr__(name):
    # Only for cli/fit.py's "from mrlcache.cli import passive_openmp" until it imports
    # mrlcache.runtime itself; lazy, so that "mrlcache --help" does not import torch.
    if name == "passive_openmp":
        from mrlcache.runtime import passive_openmp

        return passive_openmp
    raise AttributeError(f"module 'mrlcache.cli' has no attribute {name!r}")


def _register():
    # One line per command module; a module that fails to import is a bug, not something
    # to hide, so there is no try/except here.
    from mrlcache.cli import eer, embed, extract, info
    from mrlcache.cli import demo, fit
    from mrlcache.cli import make_corpus

    main.add_command(info.info)
    main.add_command(extract.extract)
    main.add_command(eer.eer)
    main.add_command(embed.embed)
    main.add_command(fit.fit)
    main.add_command(demo.demo)
    main.add_command(make_corpus.make_corpus)


_register()
