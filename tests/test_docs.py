"""The docs and shipped configs say only what the commands accept.

- every YAML in configs/ loads, its first line is the command that runs it, and its keys
  and values are valid options of that command;
- docs/configuration.md lists every option of every command with its real default and a
  YAML key that ``--config`` accepts (and is what docs/make_configuration.py generates);
- every ``mrlcache ...`` command line in docs/*.md and README.md names an existing command
  and only its options, with a value after each option that takes one, and the
  ``--config configs/...`` files it names exist;
- relative links between the docs point to existing files.

No command is run: options are checked against the click commands' parameters.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from mrlcache.cli import main
from mrlcache.config import read_yaml_options

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MARKDOWN = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "2>&1", "&"}


def _generator():
    spec = importlib.util.spec_from_file_location("make_configuration", DOCS / "make_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _default(command: click.Command, param: click.Parameter):
    """What the command receives when the option is not given; None when unset."""
    value = param.get_default(click.Context(command))
    if value is getattr(click.core, "UNSET", None) or value == ():
        return None
    return value


def _params(command: click.Command) -> list[click.Parameter]:
    return [p for p in command.params if p.name != "config"]


# --------------------------------------------------------------------- command lines


def check_command_line(tokens: list[str], *, values: bool = True) -> list[str]:
    """Problems of one ``mrlcache`` invocation (tokens after 'mrlcache'); [] if it parses.

    Args:
        values: also check that each option taking a value has one, and that positional
            arguments are accepted (off for inline mentions such as `mrlcache extract --list`).
    """
    group_flags = {opt for p in main.params if isinstance(p, click.Option) and p.is_flag for opt in p.opts}
    while tokens and tokens[0] in group_flags - {"--help", "-h", "--version"}:  # mrlcache --debug COMMAND
        tokens = tokens[1:]
    if not tokens or tokens[0].startswith("-"):
        bad = [t for t in tokens if t.startswith("-") and t not in group_flags]
        return [f"unknown group option {t}" for t in bad]
    name, rest = tokens[0], tokens[1:]
    if name.isupper() or name in ("...", "…"):  # placeholders: `mrlcache COMMAND --help`, `mrlcache ...`
        return []
    command = main.commands.get(name)
    if command is None:
        return [f"no command {name!r} (known: {', '.join(sorted(main.commands))})"]
    by_opt = {opt: p for p in command.params if isinstance(p, click.Option) for opt in p.opts}
    takes_arguments = any(isinstance(p, click.Argument) for p in command.params)
    problems, i = [], 0
    for k, token in enumerate(rest[:-1]):
        if token == "--config" and rest[k + 1].startswith("configs/") and not (ROOT / rest[k + 1]).is_file():
            problems.append(f"mrlcache {name}: --config {rest[k + 1]} does not exist")
    while i < len(rest):
        token = rest[i]
        i += 1
        if token in ("...", "…"):
            continue
        if token in ("--help", "-h"):
            continue
        if token.startswith("-"):
            opt, eq, _ = token.partition("=")
            param = by_opt.get(opt)
            if param is None:
                problems.append(f"mrlcache {name}: no option {opt}")
                i += 1 if not eq and i < len(rest) and not rest[i].startswith("-") else 0
                continue
            if param.is_flag:
                if eq:
                    problems.append(f"mrlcache {name}: {opt} is a flag and takes no value")
            elif not eq and values:
                if i >= len(rest) or rest[i].startswith("--"):
                    problems.append(f"mrlcache {name}: {opt} needs a value")
                else:
                    i += 1
            elif not eq:
                i += 1 if i < len(rest) and not rest[i].startswith("-") else 0
        elif values and not takes_arguments:
            problems.append(f"mrlcache {name}: unexpected argument {token!r}")
    return problems


def _invocations(line: str) -> list[list[str]]:
    """The argument lists of every mrlcache invocation in one shell line."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    segments, current = [], []
    for t in tokens:
        if t in SHELL_OPERATORS:
            segments.append(current)
            current = []
        else:
            current.append(t)
    segments.append(current)
    found = []
    for seg in segments:
        for k, t in enumerate(seg):
            if t != "mrlcache":
                continue
            before = seg[:k]
            is_program = all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", b) for b in before)
            if is_program or (before and before[-1] == "-m"):
                found.append(seg[k + 1:])
                break
    return found


def shell_lines(text: str) -> list[str]:
    """Command lines of the shell code blocks of a markdown text (fenced or indented).

    Python blocks are skipped; backslash continuations are joined; a leading '$ ' prompt
    is dropped.
    """
    lines, out, i = text.splitlines(), [], 0
    in_fence, fence_lang, block = False, "", []
    for line in lines + [""]:
        stripped = line.strip()
        if stripped.startswith("```"):
            if in_fence:
                if fence_lang in ("", "bash", "sh", "shell", "console", "text"):
                    out.extend(block)
                in_fence, block = False, []
            else:
                in_fence, fence_lang, block = True, stripped[3:].strip().lower(), []
            continue
        if in_fence:
            block.append(line)
        elif line.startswith("    ") and stripped:
            out.append(line)
    joined, pending = [], ""
    for line in out:
        s = line.strip()
        if s.startswith("$ "):
            s = s[2:]
        if s.endswith("\\"):
            pending += s[:-1] + " "
            continue
        joined.append(pending + s)
        pending = ""
    return joined


def inline_commands(text: str) -> list[str]:
    """Inline code spans that are mrlcache command lines (`mrlcache extract --mode eval`)."""
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    return [m for m in re.findall(r"`([^`\n]+)`", outside) if re.match(r"(\$ )?mrlcache\s+\S", m)]


def test_the_command_line_checker_catches_mistakes():
    ok = _invocations("OMP_WAIT_POLICY=PASSIVE mrlcache extract --data d --out c --mode eval --overwrite")
    assert ok and check_command_line(ok[0]) == []
    assert check_command_line(["extract", "--views", "4", "--out", "c"]) == []
    assert check_command_line(["extrakt", "--out", "c"]) == [
        f"no command 'extrakt' (known: {', '.join(sorted(main.commands))})"]
    assert check_command_line(["extract", "--vews", "4"]) == ["mrlcache extract: no option --vews"]
    assert check_command_line(["extract", "--out"]) == ["mrlcache extract: --out needs a value"]
    assert check_command_line(["fit", "--cache", "c", "stray"]) == ["mrlcache fit: unexpected argument 'stray'"]
    assert check_command_line(["make-corpus", "corpus", "--speakers", "4"]) == []
    assert check_command_line(["--debug", "extract", "--out", "c"]) == []
    assert check_command_line(["--debug", "extract", "--vews", "4"]) == ["mrlcache extract: no option --vews"]
    assert check_command_line(["--debgu", "extract"]) == ["unknown group option --debgu"]
    assert check_command_line(["fit", "--config", "configs/nope.yaml", "--out", "r"]) == [
        "mrlcache fit: --config configs/nope.yaml does not exist"]
    torchrun = _invocations("torchrun --nproc-per-node 8 -m mrlcache extract --config x.yaml --out c")
    assert torchrun == [["extract", "--config", "x.yaml", "--out", "c"]]
    assert _invocations("python -c 'import mrlcache'") == []
    assert shell_lines("```bash\nmrlcache fit \\\n  --cache c --out r\n```\n") == ["mrlcache fit  --cache c --out r"]
    assert shell_lines("```python\nmrlcache fit --nope\n```\n") == []


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_every_command_line_in_the_docs_parses(path):
    text = path.read_text()
    problems = []
    for line in shell_lines(text):
        for args in _invocations(line):
            problems += [f"{p}   in: {line.strip()}" for p in check_command_line(args)]
    for span in inline_commands(text):
        for args in _invocations(span.removeprefix("$ ")):
            problems += [f"{p}   in: `{span}`" for p in check_command_line(args, values=False)]
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)


# --------------------------------------------------------------------- shipped configs


def _header_command(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# mrlcache "), f"{path.name}: first line must be '# mrlcache COMMAND --config ...'"
    found = _invocations(first[2:])
    assert len(found) == 1, f"{path.name}: cannot parse the header command {first!r}"
    return found[0]


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"extract-vox2-b2.yaml", "extract-vox1-eval.yaml", "eer-vox1.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid_for_the_command_in_its_header(path):
    args = _header_command(path)
    assert check_command_line(args) == [], check_command_line(args)
    command = main.commands[args[0]]
    rel = path.relative_to(ROOT).as_posix()
    assert "--config" in args and args[args.index("--config") + 1] == rel, \
        f"{path.name}: the header command must pass --config {rel}"
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    options = read_yaml_options(path, command)  # unknown keys raise
    assert options, f"{path.name} sets no option"
    params = {p.name: p for p in command.params}
    ctx = click.Context(command)
    for name, value in options.items():
        param = params[name]
        if isinstance(param.type, click.Path):
            continue  # paths are placeholders that exist only on the user's machine
        param.type_cast_value(ctx, value)  # raises BadParameter on a wrong value


# ------------------------------------------------------------- where configs' inputs come from

# What a command writes: the directory or file of its output option (a fit run directory
# and the demo's folder hold everything below them).
OUTPUTS = {"extract": "out", "fit": "out", "demo": "out", "eer": "json_out", "embed": "out"}


def _option_values(args: list[str]) -> tuple[click.Command, dict[str, str]]:
    """The command of one invocation and its path-like option values (command line over
    its --config file), by parameter name."""
    command = main.commands[args[0]]
    by_opt = {opt: p for p in command.params if isinstance(p, click.Option) for opt in p.opts}
    values = {}
    if "--config" in args:
        config = ROOT / args[args.index("--config") + 1]
        values.update({k: v for k, v in read_yaml_options(config, command).items() if isinstance(v, str)})
    rest = args[1:]
    for k, token in enumerate(rest):
        param = by_opt.get(token)
        if param is not None and not param.is_flag and k + 1 < len(rest):
            values[param.name] = rest[k + 1]
    return command, values


NOT_INPUTS = {"config", "out", "json_out", "plot_out"}  # path options that name what is written


def _inputs(command: click.Command, values: dict[str, str]) -> dict[str, str]:
    """The values of the path options that name something read (caches, audio, lists, models)."""
    kinds = {p.name: p.type for p in command.params}
    return {n: v for n, v in values.items() if isinstance(kinds[n], click.Path) and n not in NOT_INPUTS}


def _producers() -> list[list[str]]:
    """Invocations that write something users then pass on: the README's and the configs' headers."""
    readme = [args for line in shell_lines((ROOT / "README.md").read_text()) for args in _invocations(line)]
    return readme + [_header_command(path) for path in CONFIGS]


def _downloads() -> list[str]:
    """The data layout docs/getting-started.md asks users to download (datasets, trial lists)."""
    text = (DOCS / "getting-started.md").read_text()
    block = re.search(r"assume this layout.*?```\n(.*?)```", text, re.S).group(1)
    return [t.rstrip("/") for t in block.split() if "/" in t]


def _norm(path: str) -> str:
    return path.rstrip("/")


def test_every_config_input_is_produced_by_a_shipped_config_or_the_readme_or_downloaded():
    produced = []
    for args in _producers():
        if args and args[0] in OUTPUTS:
            command, values = _option_values(args)
            if OUTPUTS[args[0]] in values:
                produced.append(_norm(values[OUTPUTS[args[0]]]))
            elif args[0] == "demo":
                produced.append(_norm(_default(command, next(p for p in command.params if p.name == "out"))))
    downloads = _downloads()
    problems = []
    for path in CONFIGS:
        command, values = _option_values(_header_command(path))
        for name, value in _inputs(command, values).items():
            value = _norm(value)
            made = any(value == out or value.startswith(out + "/") for out in produced)
            fetched = any(d == value or d.startswith(value + "/") for d in downloads)
            if not (made or fetched):
                problems.append(f"{path.name}: {name} {value} is written by no shipped config header or README "
                                "command and is not in the download layout of docs/getting-started.md")
    assert not problems, "\n".join(problems)


def test_the_input_check_sees_every_kind_of_input():
    # The configs name caches, a model, audio roots and trial lists; each kind is checked.
    names = set()
    for path in CONFIGS:
        command, values = _option_values(_header_command(path))
        names |= set(_inputs(command, values))
    assert {"data", "cache", "cache_dir", "val_cache", "val_trials", "model_path", "trials_path",
            "pca_cache"} <= names, names


def test_every_shipped_config_is_listed_in_the_configuration_doc():
    text = (DOCS / "configuration.md").read_text()
    missing = [p.name for p in CONFIGS if f"configs/{p.name}" not in text]
    assert not missing, f"docs/configuration.md does not list {missing}"


def test_a_wrong_key_or_value_in_a_config_is_caught(tmp_path):
    bad_key = tmp_path / "k.yaml"
    bad_key.write_text("# mrlcache extract --config k.yaml --out c\nformatt: hdf5\n")
    with pytest.raises(click.BadParameter, match="formatt"):
        read_yaml_options(bad_key, main.commands["extract"])
    precision = next(p for p in main.commands["extract"].params if p.name == "precision")
    with pytest.raises(click.BadParameter):
        precision.type_cast_value(click.Context(main.commands["extract"]), "bf32")


# --------------------------------------------------------------------- configuration.md


def _doc_tables() -> dict[str, dict[str, list[str]]]:
    """{command: {option cell: [yaml key cell, type, default, meaning]}} from configuration.md."""
    tables, current = {}, None
    for line in (DOCS / "configuration.md").read_text().splitlines():
        m = re.match(r"### `mrlcache ([\w-]+)`", line)
        if m:
            current = tables.setdefault(m.group(1), {})
            continue
        if current is not None and line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            current[cells[0].strip("`")] = cells[1:]
    return tables


def _option_cell(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return f"{param.name.upper()} (argument)"
    return ", ".join(sorted(param.opts, key=len, reverse=True))


def test_configuration_doc_lists_every_option_with_its_default():
    tables = _doc_tables()
    assert set(tables) == set(main.commands), "docs/configuration.md: commands differ from the CLI"
    problems = []
    for name, command in main.commands.items():
        rows = dict(tables[name])
        for param in _params(command):
            row = rows.pop(_option_cell(param), None)
            if row is None:
                problems.append(f"{name}: {_option_cell(param)} is missing")
                continue
            keys, _, default, _ = row
            if f"`{param.name}`" not in keys:
                problems.append(f"{name} {_option_cell(param)}: YAML key {keys} lacks `{param.name}`")
            want = _default(command, param)
            if param.required:
                ok = default == "required"
            elif want is None:
                ok = default == "—"
            else:
                ok = default.startswith("`") and yaml.safe_load(default.strip("`")) == want
            if not ok:
                problems.append(f"{name} {_option_cell(param)}: default {default} in the doc, {want!r} in the code")
        problems += [f"{name}: {opt} is documented but is not an option" for opt in rows]
    assert not problems, "docs/configuration.md:\n" + "\n".join(problems)


def test_configuration_doc_yaml_keys_are_accepted_by_config(tmp_path):
    for name, rows in _doc_tables().items():
        command = main.commands[name]
        keys = [k for row in rows.values() for k in re.findall(r"`([\w-]+)`", row[0])]
        accepted = set()
        for key in keys:  # one file per spelling: two spellings of one option are refused together
            path = tmp_path / f"{name}.yaml"
            path.write_text(f"{key}: null\n")
            accepted |= set(read_yaml_options(path, command))  # raises on a key --config rejects
        assert accepted == {p.name for p in _params(command)}


def test_configuration_doc_is_what_the_generator_writes():
    gen = _generator()
    text = (DOCS / "configuration.md").read_text()
    assert gen.generated_section(main) in text, \
        "docs/configuration.md is out of date: run python docs/make_configuration.py"
    stale = [key for key in gen.EXTRA
             if key[0] not in main.commands or key[1] not in {p.name for p in main.commands[key[0]].params}]
    assert not stale, f"docs/make_configuration.py EXTRA names options that no longer exist: {stale}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_relative_links_point_to_existing_files(path):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    broken = [link for link in links if "://" not in link and not (path.parent / link).exists()]
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"
