"""Options from YAML files (mrlcache.config): values, command line wins, refusals."""

import re

import click
import pytest
from click.testing import CliRunner

from mrlcache.config import config_option, load_yaml, read_yaml_options


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


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("views: 2\ncrop-seconds: 1\nviews: 3\n")
    with pytest.raises(Exception, match="duplicate key 'views' on lines 1 and 3"):
        load_yaml(cfg)
    result = CliRunner().invoke(_probe, ["--config", str(cfg)])
    assert result.exit_code == 2 and f"{cfg}:3: not valid YAML: duplicate key 'views'" in result.output


def test_nested_duplicate_keys_are_refused_too(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("a:\n  x: 1\n  x: 2\n")
    with pytest.raises(Exception, match="duplicate key 'x' on lines 2 and 3"):
        load_yaml(cfg)


@pytest.mark.parametrize("text, message", [
    ("views: [1, 2]\n", "views: expected a single value, got a list ([1, 2])"),
    ("crop-seconds: {a: 1}\n", "crop-seconds: expected a single value, got a mapping"),
    ("views: 1\nviews_: 2\n", "unknown option(s) views_"),
    ("format: zarr\nbackend: hdf5\n", "'format' and 'backend' set the same option"),
])
def test_a_value_in_the_wrong_shape_or_twice_is_refused(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(click.BadParameter, match=re.escape(message)):
        read_yaml_options(cfg, _probe)


def test_a_list_option_takes_a_yaml_list_or_the_comma_text(tmp_path):
    from mrlcache.cli import main
    from mrlcache.config import read_yaml_options

    fit = main.commands["fit"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dims: [64, 128, 256]\n")
    options = read_yaml_options(cfg, fit)
    ctx = fit.make_context("fit", ["--out", str(tmp_path / "r")], default_map=options, resilient_parsing=True)
    assert ctx.params["dims"] == (64, 128, 256)  # as from --dims 64,128,256
    ctx = fit.make_context("fit", ["--out", str(tmp_path / "r"), "--dims", "64,128,256"], resilient_parsing=True)
    assert ctx.params["dims"] == (64, 128, 256)
    cfg.write_text("dims: [[64], 128]\n")
    with pytest.raises(click.BadParameter, match="single value"):
        read_yaml_options(cfg, fit)


def test_config_file_takes_options_grouped_by_component(tmp_path):
    """fit and extract read a file's options flat or nested as their config dataclasses
    (mrlcache.components.flatten); an option given both ways is refused naming both."""
    from mrlcache.cli import main

    nested = tmp_path / "fit.yaml"
    nested.write_text("optim: {lr: 0.5, batch-size: 64}\nhead: {name: ecapa, dims: [8, 16]}\nseed: 3\n")
    params = main.commands["fit"].make_context("fit", ["--config", str(nested), "--out", "r"]).params
    assert (params["lr"], params["batch_size"], params["head"], params["dims"], params["seed"]) == \
        (0.5, 64, "ecapa", (8, 16), 3)
    extract = tmp_path / "extract.yaml"
    extract.write_text("views: {mode: eval, views: 1}\nstorage: {format: hdf5}\nbackbone: {name: campplus}\n")
    params = main.commands["extract"].make_context("extract", ["--config", str(extract), "--out", "c"]).params
    assert (params["mode"], params["views"], params["backend"], params["backbone_name"]) == \
        ("eval", 1, "hdf5", "campplus")
    both = tmp_path / "both.yaml"
    both.write_text("lr: 0.1\noptim: {lr: 0.2}\n")
    with pytest.raises(click.BadParameter, match="lr and optim.lr set the same option"):
        main.commands["fit"].make_context("fit", ["--config", str(both), "--out", "r"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim: {lrr: 0.2}\n")
    with pytest.raises(click.BadParameter, match=r"optim.lrr: not an option of optim"):
        main.commands["fit"].make_context("fit", ["--config", str(typo), "--out", "r"])
