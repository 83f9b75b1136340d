"""The command-line group: help, version, ``python -m mrlcache``, and --debug."""

import subprocess
import sys

from click.testing import CliRunner

from mrlcache import __version__
from mrlcache.cli import main


def test_help_lists_commands_and_version():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in main.commands:
        assert name in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_python_dash_m_runs_the_same_group():
    out = subprocess.run(
        [sys.executable, "-m", "mrlcache", "--help"], capture_output=True, text=True, check=True
    )
    for name in main.commands:
        assert name in out.stdout


def test_every_command_has_help():
    runner = CliRunner()
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_debug_is_an_option_of_the_group():
    result = CliRunner().invoke(main, ["--help"])
    assert "--debug" in result.output
