"""Options from YAML files: ``--config FILE`` on every command, command-line values win.

A config file is a mapping of option names (``crop-seconds`` or ``crop_seconds``; an
option's parameter name such as ``backend`` for ``--format`` works too) to values. A key
that is not an option of the command, a key given twice (also as two spellings of one
option) and a list or mapping where one value belongs are errors, so a typo never passes
silently. A repeatable option takes a list or a single value. Options made from a nested
config dataclass (``fit``'s, ``extract``'s) may also be given by group, ``optim: {lr: 0.1}``,
as the run files write them (:mod:`mrlcache.components`). The resolved options of a
run are written next to its output with :func:`write_resolved`.
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error
    (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on lines {seen[key]} and {line}", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path):
    """Parse a YAML file with the safe loader, refusing duplicate keys (raises yaml.YAMLError)."""
    from mrlcache.runtime import read_text

    return yaml.load(read_text(path), Loader=_UniqueKeyLoader)


def read_yaml_options(path: str | Path, command: click.Command) -> dict:
    """Read a YAML config file and check its keys against ``command``'s options.

    Returns a dict keyed by the click parameter names (underscored).
    """
    path = Path(path)
    try:
        data = load_yaml(path)
    except OSError as err:
        raise click.BadParameter(f"{path}: cannot read ({err.strerror or err})", param_hint="--config")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
        raise click.BadParameter(f"{where}: not valid YAML: {problem}", param_hint="--config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.BadParameter(
            f"{path}: expected a mapping of option names to values, got {type(data).__name__}",
            param_hint="--config",
        )
    data = _flatten_groups(path, data, command)
    # A key is an option's long name (``format``, ``crop-seconds``) or its parameter name
    # (``backend``, ``crop_seconds``), with - and _ alike.
    known, params = {}, {}
    for param in command.params:
        if not param.name or param.name == "config":
            continue
        known[param.name] = param.name
        params[param.name] = param
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                known[opt[2:].replace("-", "_")] = param.name
    options, unknown, given_as = {}, [], {}
    for key, value in data.items():
        name = known.get(str(key).replace("-", "_"))
        if not name:
            unknown.append(str(key))
            continue
        if name in options:
            raise click.BadParameter(f"{path}: {given_as[name]!r} and {key!r} set the same option; keep one",
                                     param_hint="--config")
        options[name], given_as[name] = _check_value(path, key, value, params[name]), key
    if unknown:
        raise click.BadParameter(
            f"{path}: unknown option(s) {', '.join(sorted(unknown))} for "
            f"'mrlcache {command.name}'; known: {', '.join(sorted(k.replace('_', '-') for k in known))}",
            param_hint="--config",
        )
    return options


def _flatten_groups(path: Path, data: dict, command: click.Command) -> dict:
    """The nested form of a file (``optim: {lr: 0.1}``) as flat keys, for options made from a
    nested config dataclass (:func:`mrlcache.components.flatten`, the one conversion)."""
    from mrlcache.components import flatten

    for cls in dict.fromkeys(getattr(p, "config_class", None) for p in command.params):
        if cls is not None:
            try:
                data = flatten(cls, data)
            except ValueError as err:
                raise click.BadParameter(f"{path}: {err}", param_hint="--config") from None
    return data


class CommaList(click.ParamType):
    """A list option: ``64,128,192`` on the command line, that or a YAML list in a config file.

    The command receives the comma-separated text either way and parses it itself.
    """

    name = "list"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            if any(isinstance(v, (list, tuple, dict)) for v in value):
                self.fail(f"{value!r}: expected a flat list of values", param, ctx)
            return ",".join(str(v) for v in value)
        return value


def _check_value(path: Path, key, value, param: click.Parameter):
    """A YAML value in the shape the option takes: one value, or a list for a repeatable option."""
    if isinstance(param.type, CommaList) and isinstance(value, list):
        bad = [v for v in value if isinstance(v, (list, dict))]
    elif getattr(param, "multiple", False) or param.nargs != 1:
        value = value if isinstance(value, list) else [value]
        bad = [v for v in value if isinstance(v, (list, dict))]
    else:
        bad = [value] if isinstance(value, (list, dict)) else []
    if bad:
        kind = "list" if isinstance(bad[0], list) else "mapping"
        raise click.BadParameter(f"{path}: {key}: expected a single value, got a {kind} ({bad[0]!r})",
                                 param_hint="--config")
    return value


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
    from mrlcache.runtime import atomic_write

    atomic_write(path, f"# mrlcache {ctx.command.name}: resolved options\n"
                 + yaml.safe_dump(resolved_options(ctx), sort_keys=True))
