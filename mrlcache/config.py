"""Options from YAML files: ``--config FILE`` on every command, command-line values win.

A config file is a flat mapping of option names (``crop-seconds`` or ``crop_seconds``; an
option's parameter name such as ``backend`` for ``--format`` works too) to values. A key that is not an option of the command is an error, so a typo never passes
silently. The resolved options of a run are written next to its output with
:func:`resolved_options`.
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml


def read_yaml_options(path: str | Path, command: click.Command) -> dict:
    """Read a YAML config file and check its keys against ``command``'s options.

    Returns a dict keyed by the click parameter names (underscored).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise click.BadParameter(f"{path}: cannot read as YAML ({err})", param_hint="--config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.BadParameter(
            f"{path}: expected a mapping of option names to values, got {type(data).__name__}",
            param_hint="--config",
        )
    # A key is an option's long name (``format``, ``crop-seconds``) or its parameter name
    # (``backend``, ``crop_seconds``), with - and _ alike.
    known = {}
    for param in command.params:
        if not param.name or param.name == "config":
            continue
        known[param.name] = param.name
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                known[opt[2:].replace("-", "_")] = param.name
    options, unknown = {}, []
    for key, value in data.items():
        name = known.get(str(key).replace("-", "_"))
        if name:
            options[name] = value
        else:
            unknown.append(str(key))
    if unknown:
        raise click.BadParameter(
            f"{path}: unknown option(s) {', '.join(sorted(unknown))} for "
            f"'mrlcache {command.name}'; known: {', '.join(sorted(k.replace('_', '-') for k in known))}",
            param_hint="--config",
        )
    return options


def _load_config(ctx: click.Context, param: click.Parameter, value):
    if value:
        options = read_yaml_options(value, ctx.command)
        # default_map is consulted for every option not given on the command line,
        # which is exactly "command-line values win".
        ctx.default_map = {**(ctx.default_map or {}), **options}
    return value


def config_option(command):
    """Decorator adding ``--config FILE`` to a click command."""
    return click.option(
        "--config",
        type=click.Path(exists=True, dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config,
        help="YAML file of option values; options given on the command line win.",
    )(command)


def resolved_options(ctx: click.Context) -> dict:
    """The final value of every option of the running command, YAML-serialisable."""
    out = {}
    for name, value in ctx.params.items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[name] = value
    return out


def write_resolved(ctx: click.Context, path: str | Path) -> None:
    """Write the resolved options of the running command as YAML to ``path``."""
    Path(path).write_text(
        f"# mrlcache {ctx.command.name}: resolved options\n"
        + yaml.safe_dump(resolved_options(ctx), sort_keys=True)
    )
