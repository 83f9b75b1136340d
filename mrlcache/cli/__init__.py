"""The ``mrlcache`` command line: a click group with one module per command.

Each command module keeps its heavy imports (torch, zarr, ...) inside the command body so
that ``mrlcache --help`` answers at once. No traceback reaches a user for bad input: the
commands turn the library's errors into one-line messages, and the group turns any
operating-system failure left (a full disk, a read-only output, an unreadable folder)
into one line naming the path; ``mrlcache --debug COMMAND`` shows the traceback instead.
"""

import errno

import click

from mrlcache import __version__


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as err:
            if ctx.params.get("debug") or err.errno == errno.EPIPE:  # EPIPE: click's own handling
                raise
            from mrlcache.cli.options import describe_os_error

            raise click.ClickException(describe_os_error(err)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mrlcache")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an operating-system error.")
def main(debug):
    """Matryoshka speaker embeddings from a frozen ReDimNet, feature-cache-first.

    Typical flow: extract (once) -> fit (minutes) -> eer.
    """


def _register():
    # One line per command module; a module that fails to import is a bug, not something
    # to hide, so there is no try/except here.
    from mrlcache.cli import eer, embed, extract, info
    from mrlcache.cli import demo, fit
    from mrlcache.cli import make_corpus
    from mrlcache.cli import check, export, export_vectors, import_vectors
    from mrlcache.cli import calibrate, verify
    from mrlcache.cli import runs

    main.add_command(info.info)
    main.add_command(extract.extract)
    main.add_command(eer.eer)
    main.add_command(embed.embed)
    main.add_command(fit.fit)
    main.add_command(demo.demo)
    main.add_command(make_corpus.make_corpus)
    main.add_command(check.check)
    main.add_command(import_vectors.import_vectors)
    main.add_command(export_vectors.export_vectors)
    main.add_command(export.export)
    main.add_command(calibrate.calibrate)
    main.add_command(verify.verify)
    main.add_command(runs.runs)


_register()
