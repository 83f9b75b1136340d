"""Hostile environments and run folders: malformed torchrun variables, run summaries of the wrong shape."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import make_tree

from mrlcache.cli import main


def error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("env, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' in the environment is not an integer >= 0"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0' in the environment is not an integer >= 1"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 is not below WORLD_SIZE=2"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK='-1' in the environment is not an integer >= 0"),
    ({"LOCAL_RANK": "zero"}, "LOCAL_RANK='zero' in the environment is not an integer >= 0"),
])
def test_malformed_rank_variables_are_one_line(tmp_path, env, message):
    make_tree(tmp_path / "data", speakers=2, videos=1, utts=1, seconds=0.5)
    result = CliRunner().invoke(main, ["extract", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"),
                                       "--random-init", "--variant", "b0"], env=env)
    assert message in error_line(result)
    assert not (tmp_path / "c" / "shards").exists()


@pytest.mark.parametrize("summary", [
    [1, 2, 3],
    {"best": [0.1]},
    {"best": {"mean_eer": "low", "eer": {"8": 0.1}}},
    {"best": {"mean_eer": 0.1, "eer": {"eight": 0.1}}},
])
def test_runs_with_a_summary_of_the_wrong_shape_is_one_line(tmp_path, summary):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("dims: [8]\n")
    (run / "history.jsonl").write_text(json.dumps({"epoch": 0, "seconds": 1.0}) + "\n")
    (run / "summary.json").write_text(json.dumps(summary))
    line = error_line(CliRunner().invoke(main, ["runs", str(run)]))
    assert str(run) in line and "finished fits" in line
