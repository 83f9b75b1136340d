"""``mrlcache demo``: the whole pipeline on a built-in synthetic corpus, no downloads."""

import click

from mrlcache.backbone.registry import backbone_names
from mrlcache.cli.options import SEED
from mrlcache.config import config_option


@click.command()
@config_option
@click.option("--out", default="mrlcache-demo", show_default=True, type=click.Path(file_okay=False),
              help="Everything the demo writes goes here (a previous demo there is replaced).")
@click.option("--quick", is_flag=True, help="A smaller corpus and fewer epochs (about a minute; used in CI).")
@click.option("--backbone", "backbone_name", type=click.Choice(backbone_names()), default=None,
              help="Frozen encoder of --weights [default: told by the file].")
@click.option("--weights", type=click.Path(exists=True), help="Real backbone: a ReDimNet checkpoint, a SpeechBrain "
              "ECAPA-TDNN folder, a 3D-Speaker CAM++ state dict.")
@click.option("--variant", default=None, help="Real backbone: published ReDimNet name (downloaded once).")
@click.option("--seed", type=SEED, default=0, show_default=True)
def demo(out, quick, backbone_name, weights, variant, seed):
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
                           random_init=not (weights or variant), backbone_name=backbone_name, echo=click.echo)
    except ValueError as err:
        raise click.ClickException(str(err))
    by_system = {}
    for row in results["results"]:
        by_system.setdefault(row["system"], []).append(row["eer"])
    best_mrl, raw = min(by_system["mrl"]), min(by_system["raw"])
    published = f", published embedding {100 * min(by_system['published']):.1f}%" if "published" in by_system else ""
    click.echo(f"demo finished in {time.perf_counter() - started:.0f} s: best Matryoshka EER {100 * best_mrl:.1f}% "
               f"vs raw pooled vectors {100 * raw:.1f}%{published} (everything is under {out})")
