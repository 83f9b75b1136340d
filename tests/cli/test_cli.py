"""The command-line group: help, version, and options from YAML files."""

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from mrlcache import __version__
from mrlcache.cli import main
from mrlcache.config import config_option


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


@click.command()
@config_option
@click.option("--crop-seconds", type=float, default=2.0)
@click.option("--views", type=int, default=1)
@click.option("--format", "backend", default="zarr")
def _probe(crop_seconds, views, backend):
    click.echo(f"{crop_seconds} {views} {backend}")


def test_config_file_values_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("crop-seconds: 3.5\nviews: 4\nformat: hdf5\n")
    runner = CliRunner()
    assert runner.invoke(_probe, ["--config", str(cfg)]).output.strip() == "3.5 4 hdf5"
    assert runner.invoke(_probe, ["--config", str(cfg), "--views", "2"]).output.strip() == "3.5 2 hdf5"
    assert runner.invoke(_probe, ["--views", "2", "--config", str(cfg)]).output.strip() == "3.5 2 hdf5"
    cfg.write_text("crop_seconds: 1.5\nbackend: hdf5\n")  # parameter names work too
    assert runner.invoke(_probe, ["--config", str(cfg)]).output.strip() == "1.5 1 hdf5"


@pytest.mark.parametrize("text, message", [("vieews: 3\n", "vieews"), ("- 1\n- 2\n", "mapping")])
def test_config_file_errors_are_clear(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    result = CliRunner().invoke(_probe, ["--config", str(cfg)])
    assert result.exit_code != 0
    assert message in result.output and str(cfg) in result.output
