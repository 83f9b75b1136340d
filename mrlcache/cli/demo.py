"""``mrlcache demo``: the whole pipeline on a built-in synthetic corpus, no downloads."""

import click

from mrlcache.cli.options import SEED
from mrlcache.config import config_option


@click.command()
@config_option
@click.option("--out", default="mrlcache-demo", show_default=True, type=click.Path(file_okay=False),
              help="Everything the demo writes goes here (a previous demo there is replaced).")
@click.option("--quick", is_flag=True, help="A smaller corpus and fewer epochs (about a minute; used in CI).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Real backbone: a published-format checkpoint.")
@click.option("--variant", default=None, help="Real backbone: published ReDimNet name (downloaded once).")
@click.option("--seed", type=SEED, default=0, show_default=True)
def demo(out, quick, weights, variant, seed):
    """Make a synthetic corpus, extract, fit the Matryoshka head, score: EER per dim."""
    import time

    from mrlcache.demo import FULL, QUICK, run_demo

    root = click.get_current_context().find_root()
    main = root.command  # the mrlcache group (taken from the context: no import of the group here)
    debug = ["--debug"] if root.params.get("debug") else []

    def run(args):  # each demo step is the real command, run in this process
        main.main(args=[*debug, *args], prog_name="mrlcache", standalone_mode=False)

    started = time.perf_counter()
    try:
        results = run_demo(out, run, QUICK if quick else FULL, seed=seed, variant=variant or "b0", weights=weights,
                           random_init=not (weights or variant), echo=click.echo)
    except ValueError as err:
        raise click.ClickException(str(err))
    by_system = {}
    for row in results["results"]:
        by_system.setdefault(row["system"], []).append(row["eer"])
    best_mrl, raw = min(by_system["mrl"]), min(by_system["raw"])
    click.echo(f"demo finished in {time.perf_counter() - started:.0f} s: best Matryoshka EER {100 * best_mrl:.1f}% "
               f"vs raw pooled vectors {100 * raw:.1f}% (everything is under {out})")
