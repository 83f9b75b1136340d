"""Hostile numeric options: every number finite and in its range, refused in one line naming
the option and the range, before any work (issue 19's non-finite cases, and every other
numeric option of the config dataclasses).

The bad option is given first on the command line, so click checks it before anything
else; no file needs to exist for those cases.
"""

import math

import pytest
from click.testing import CliRunner

from conftest import error_line
from mrlcache import ranges
from mrlcache.components import field_of, leaves
from mrlcache.cli import main
from mrlcache.extract.config import ExtractConfig, ExtractError
from mrlcache.fit.config import EndToEndConfig, FitConfig, FitError, make_configs
from mrlcache.scorer import ScoreConfig
from mrlcache.trial_vectors import EvaluateError


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])




# (command, option, value, what the line must say): issue 19's list first.
CASES = [
    ("fit", "--lr", "inf", "is not a finite number > 0 and <= 10"),
    ("fit", "--lr", "1e30", "is not a finite number > 0 and <= 10"),
    ("fit", "--scale", "inf", "is not a finite number > 0 and <= 1000"),
    ("fit", "--weight-decay", "inf", "is not a finite number >= 0 and <= 10"),
    ("fit", "--dim-weights", "1,nan", "nan is not a finite number >= 0"),
    ("fit", "--margin", "inf", "is not a finite number >= 0 and <= 1.5 (radians)"),
    ("fit", "--margins", "0.1,0.2,inf,0.2", "inf is not a finite number >= 0 and <= 1.5 (radians)"),
    ("fit", "--seed", "-1", "is not an integer >= 0 and <= 4294967295"),
    ("fit", "--dims", "", "give at least one value"),
    ("fit", "--dims", "64,x", "'x' is not an integer >= 1; give comma-separated values, e.g. 64,128"),
    ("fit", "--momentum", "1", "is not a finite number >= 0 and < 1"),
    ("fit", "--class-sample", "0", "is not a finite number > 0 and <= 1"),
    ("fit", "--memory-gb", "nan", "is not a finite number > 0"),
    ("fit", "--epochs", "1.5", "'1.5' is not an integer >= 1"),
    ("fit", "--batch-size", "1", "is not an integer >= 2"),
    ("fit", "--backbone-lr", "inf", "is not a finite number > 0 and <= 10"),
    ("extract", "--max-seconds", "inf", "is not a finite number >= 0.02 (seconds)"),
    ("extract", "--window-seconds", "inf", "is not a finite number >= 1 (seconds), nor 'none'"),
    ("extract", "--seed", "-1", "is not an integer >= 0"),
    ("extract", "--crop-seconds", "nan", "is not a finite number > 0 (seconds)"),
    ("extract", "--seed", str(2**64), "is not an integer >= 0 and <= 4294967295"),
    ("eer", "--dims", "", "give at least one value"),
    ("eer", "--max-seconds", "inf", "is not a finite number >= 0.02"),
    ("eer", "--window-seconds", "nan", "is not a finite number >= 1"),
    ("eer", "--asnorm-topk", "0", "is not an integer >= 1"),
    ("calibrate", "--dims", " ", "give at least one value"),
    ("calibrate", "--seed", "-1", "is not an integer >= 0"),
    ("calibrate", "--prior", "nan", "is not a finite number > 0 and < 1"),
    ("calibrate", "--topk", "0", "is not an integer >= 1"),
    ("calibrate", "--make-trials", "0", "is not an integer >= 1"),
    ("verify", "--far", "inf", "is not a finite number > 0 and < 1"),
    ("verify", "--dim", "0", "is not an integer >= 1"),
    ("embed", "--max-seconds", "inf", "is not a finite number >= 0.02"),
    ("export", "--opset", "99", "is not an integer >= 17 and <= 23"),
    ("export", "--opset", "-1", "is not an integer >= 17 and <= 23"),
    ("export", "--dims", "", "give at least one value"),
    ("demo", "--seed", "-1", "is not an integer >= 0"),
    ("make-corpus", "--max-seconds", "inf", "is not a finite number >= 0.1 (seconds)"),
    ("import-vectors", "--shard-size", "0", "is not an integer >= 1"),
    ("export-vectors", "--view", "-1", "is not an integer >= 0"),
]


@pytest.mark.parametrize("command, option, value, message", CASES, ids=[f"{c[0]} {c[1]} {c[2]!r}" for c in CASES])
def test_a_bad_number_is_refused_in_one_line_naming_the_option(command, option, value, message):
    line = error_line(run(command, option, value))
    assert f"'{option}'" in line and message in line, line


def _numeric_options(cls, command):
    """(command, --flag, Range) of every field of ``cls`` with a declared range that ``command`` offers."""
    params = {p.name: p for p in main.commands[command].params}
    out = []
    for key, (_, f) in leaves(cls).items():
        rng = f.metadata.get("range")
        if rng is not None and key in params:
            out.append((command, params[key].opts[0], rng))
    return out


DERIVED = (_numeric_options(FitConfig, "fit") + _numeric_options(EndToEndConfig, "fit")
           + _numeric_options(ExtractConfig, "extract") + [("eer", "--asnorm-topk", ScoreConfig.__dataclass_fields__[
               "asnorm_topk"].metadata["range"])])


@pytest.mark.parametrize("command, option, rng", DERIVED, ids=[f"{c} {o}" for c, o, _ in DERIVED])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_every_numeric_option_of_the_configs_refuses_non_finite_values(command, option, rng, value):
    line = error_line(run(command, option, value))
    assert f"'{option}'" in line and rng.text() in line, line


@pytest.mark.parametrize("command, option, rng", DERIVED, ids=[f"{c} {o}" for c, o, _ in DERIVED])
def test_every_bounded_option_refuses_a_value_just_outside(command, option, rng):
    if rng.lo is not None:
        bad = rng.lo - 1 if rng.integer or not rng.lo_open else rng.lo
    else:
        bad = rng.hi + 1 if rng.integer or not rng.hi_open else rng.hi
    line = error_line(run(command, option, bad))
    assert f"'{option}'" in line and rng.text() in line, line


def _fields(cls):
    """The flat keys of the ranged options of a config (nested by component or not)."""
    return [key for key, (_, f) in leaves(cls).items() if "range" in f.metadata]


@pytest.mark.parametrize("name", _fields(FitConfig))
def test_the_library_refuses_what_the_command_line_refuses(name):
    """FitConfig used from Python (no click) runs the same ranges."""
    rng = ranges.range_of(FitConfig, name)
    value = math.inf if not rng.integer else -1 if rng.lo is not None else 10**9
    many = isinstance(field_of(FitConfig, name).default, tuple) or field_of(FitConfig, name).metadata.get("many")
    if name == "dims":
        value = (64, value if rng.integer else 128)
    elif many:
        value = (0.1, value, 0.1, 0.1)
    with pytest.raises(FitError, match=ranges.flag(name) if name != "dims" else "dims"):
        make_configs((64, 128, 192, 256) if name != "dims" else value, {} if name == "dims" else {name: value})


@pytest.mark.parametrize("name", _fields(EndToEndConfig))
def test_the_end_to_end_options_are_checked_in_the_library(name):
    rng = ranges.range_of(EndToEndConfig, name)
    value = math.nan if not rng.integer else -1
    with pytest.raises(FitError, match=ranges.flag(name)):
        make_configs((64,), {name: value, "variant": "b0"}, end_to_end=True)


@pytest.mark.parametrize("name", _fields(ExtractConfig))
def test_extract_config_refuses_out_of_range_values(name):
    rng = ranges.range_of(ExtractConfig, name)
    value = math.inf if not rng.integer else -1
    with pytest.raises(ExtractError, match=ranges.flag(name)):
        ExtractConfig.of(mode="eval" if name in ("max_seconds", "window_seconds") else "train", **{name: value})


def test_score_config_refuses_a_bad_topk_and_two_cohorts():
    with pytest.raises(EvaluateError, match="--asnorm-topk 0: must be an integer >= 1"):
        ScoreConfig(asnorm_topk=0)
    with pytest.raises(EvaluateError, match="at most one of --asnorm-cohort and --snorm-cohort"):
        ScoreConfig(asnorm_cohort="a", snorm_cohort="b")


@pytest.mark.parametrize("value, ok", [(0.5, True), (0, False), (1, False), (math.inf, False), (math.nan, False),
                                       (True, False), ("0.5", False)])
def test_a_range_is_finite_and_typed(value, ok):
    assert ranges.PROBABILITY.ok(value) is ok


def test_a_plot_with_an_unknown_image_type_is_refused_before_scoring(tmp_path):
    pytest.importorskip("matplotlib")
    model, trials, cache = tmp_path / "model.pt", tmp_path / "t.txt", tmp_path / "cache"
    model.write_bytes(b"not read: --plot is checked first")
    trials.write_text("1 a.wav b.wav\n")
    cache.mkdir()
    for name in ("curves.xyz", "curves"):
        line = error_line(run("eer", "--model", model, "--trials", trials, "--cache", cache, "--plot", tmp_path / name))
        assert "'--plot'" in line and "image type" in line and ".png" in line, line
