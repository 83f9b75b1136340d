"""``mrlcache info``: versions and devices, for bug reports."""

import click

from mrlcache.config import config_option


@click.command()
@config_option
def info():
    """Print the versions of mrlcache and its main dependencies, and the devices seen."""
    import platform

    import torch

    from mrlcache import __version__

    click.echo(f"mrlcache {__version__}")
    click.echo(f"python {platform.python_version()}")
    click.echo(f"torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    click.echo(f"cuda available: {cuda}" + (f" ({torch.cuda.device_count()} devices)" if cuda else ""))
    click.echo(f"cpu threads: {torch.get_num_threads()}")
