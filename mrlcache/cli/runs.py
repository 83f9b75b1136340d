"""``mrlcache runs``: one table comparing fit run directories."""

import json
import click


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if column == "mean_eer" or column.startswith("eer@") or column == "raw_eer":
        return f"{100 * value:.2f}"  # EER in percent
    if column.startswith("mindcf@"):
        return f"{value:.3f}"
    return str(value)


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--sort", "sort", default="mean_eer", show_default=True,
              help="Column to sort by, e.g. mean_eer, eer@128, seconds, epochs, run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the rows (EERs as fractions) to this JSON file.")
def runs(runs, sort, json_path):
    """Compare fits: inputs, fusion, head, dims, best validation EER % and minDCF per dim, epochs, seconds."""
    from rich.console import Console
    from rich.table import Table

    from mrlcache.fit.report import runs_table
    from mrlcache.paths import check_output
    from mrlcache.runtime import atomic_write

    check_output(json_path, runs, "--json")  # and a run's own files: check_output knows them

    try:
        columns, rows = runs_table(runs, sort=sort)
    except ValueError as err:
        raise click.ClickException(str(err))
    table = Table(title=f"{len(rows)} runs, sorted by {sort} (EER in %)")
    for c in columns:
        table.add_column(c, justify="left" if c in ("run", "inputs", "fusion", "head", "dims") else "right",
                         overflow="fold")  # run paths wrap rather than being cut
    for r in rows:
        table.add_row(*(_cell(c, r.get(c)) for c in columns))
    Console(width=max(160, 12 * len(columns))).print(table)
    if json_path:
        atomic_write(json_path, json.dumps({"sort": sort, "columns": columns, "runs": rows}, indent=2) + "\n")
