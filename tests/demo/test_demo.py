"""The quick demo runs the whole pipeline, and the README's Python API block runs on its output."""

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mrlcache.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One quick demo, run from an empty working directory."""
    cwd = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, ["demo", "--quick", "--out", "mrlcache-demo"])
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return cwd, result.output


def test_quick_demo_prints_the_table_and_the_head_beats_raw_vectors(demo_run):
    cwd, output = demo_run
    assert "randomly initialised" in output
    for command in ("make-corpus", "extract", "fit", "eer"):
        assert f"$ mrlcache {command}" in output
    assert sorted(p.name for p in cwd.iterdir()) == ["mrlcache-demo"]  # nothing outside --out
    results = json.loads((cwd / "mrlcache-demo" / "results.json").read_text())
    mrl = {r["dim"]: r["eer"] for r in results["results"] if r["system"] == "mrl"}
    raw = [r["eer"] for r in results["results"] if r["system"] == "raw"]
    assert sorted(mrl) == [64, 128, 192, 256] and len(raw) == 1
    # A head trained on a random feature extractor must clearly beat cosine on its raw
    # vectors (the full demo: about half; the quick one has few trials, so a loose bound).
    assert max(mrl.values()) < 0.8 * raw[0], (mrl, raw)
    assert re.search(r"mrl\s+│\s+64", output)


def test_demo_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "not a previous demo" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_readme_python_block_runs_on_the_demo_output(demo_run):
    cwd, _ = demo_run
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API\n+```python\n(.*?)```", text, re.S).group(1)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(old)
    assert set(namespace["emb"]) == {64, 128, 192, 256}
    assert 0.0 <= namespace["eer"] < 0.5
    assert namespace["backbone"].weights_sha256 == namespace["model"].weights_sha256
