"""Hostile outputs: no command writes over one of its inputs or a cache's or run's own files.

Issue 19's overwrite cases, each refused in one line before any work, with the file it
would have destroyed unchanged; demo --out deletes only a folder it can prove it wrote;
a link planted under a temporary name never redirects a write; an interrupted pair
write never leaves new vectors beside old ids.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tree
from test_eer_cli import _model_file

from mrlcache import runtime
from mrlcache.cli import main
from mrlcache.demo.run import prepare_out
from mrlcache.interop import InteropError, read_vectors, write_vectors
from mrlcache.paths import CACHE_FILES, OutputPathError, check_output


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    """The one 'Error:' line; fails on a traceback (any exception but SystemExit)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-out")
    run_dir = root / "run"
    run_dir.mkdir()
    _model_file(run_dir / "model.pt", backbone_seed=0)
    cache = root / "cache"
    cache.mkdir()
    (cache / "cache.json").write_text("{}")
    data = root / "data"
    make_tree(data, speakers=2, videos=1, utts=1, seconds=0.5)
    (root / "trials.txt").write_text("1 a b\n")
    return root, run_dir, cache, sorted(data.rglob("*.wav"))


def _unchanged(path, before: bytes):
    assert path.read_bytes() == before


@pytest.mark.parametrize("case", ["export-model", "export-link", "calibrate-model", "verify-audio", "eer-model",
                                  "eer-cache-json", "eer-plot-trials", "runs-model", "runs-summary-link"])
def test_outputs_over_inputs_and_metadata_are_refused(world, tmp_path, case):
    root, run_dir, cache, wavs = world
    model = run_dir / "model.pt"
    link = tmp_path / "out.onnx"
    link.symlink_to(model)
    victim, args, message = {
        "export-model": (model, ["export", model, "--format", "onnx", "--out", model], "is the input"),
        "export-link": (model, ["export", model, "--format", "onnx", "--out", link], "is the input"),
        "calibrate-model": (model, ["calibrate", "--model", model, "--cache", cache, "--make-trials", "10",
                                    "--out", model], "is the input"),
        "verify-audio": (wavs[0], ["verify", "--model", model, wavs[0], wavs[1], "--json", wavs[0]], "is the input"),
        "eer-model": (model, ["eer", "--model", model, "--trials", root / "trials.txt", "--cache", cache,
                              "--json", model], "is the input"),
        "eer-cache-json": (cache / "cache.json", ["eer", "--model", model, "--trials", root / "trials.txt",
                                                  "--cache", cache, "--json", cache / "cache.json"],
                           "is the cache"),
        "eer-plot-trials": (root / "trials.txt", ["eer", "--model", model, "--trials", root / "trials.txt",
                                                  "--cache", cache, "--plot", root / "trials.txt"], "is the input"),
        "runs-model": (model, ["runs", run_dir, "--json", model], "is the run"),
        "runs-summary-link": (model, ["runs", run_dir, "--json", link], "is the run"),
    }[case]
    before = victim.read_bytes()
    line = error_line(run(*args))
    assert message in line and "choose" in line
    _unchanged(victim, before)


def test_fit_out_never_replaces_a_folder_that_is_not_a_resumable_run(world, tmp_path):
    root, run_dir, cache, _ = world
    before = (run_dir / "model.pt").read_bytes()
    line = error_line(run("fit", "--cache", cache, "--out", run_dir, "--dims", "8"))
    assert "no last.pt, so it is not a resumable run" in line
    _unchanged(run_dir / "model.pt", before)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.yaml").write_text("mine: 1\n")
    assert "not a resumable run" in error_line(run("fit", "--cache", cache, "--out", theirs, "--dims", "8"))
    assert (theirs / "config.yaml").read_text() == "mine: 1\n"
    assert "is a cache" in error_line(run("fit", "--cache", cache, "--out", cache, "--dims", "8"))


def test_import_out_may_not_hold_its_input(tmp_path):
    folder = tmp_path / "vecs"
    folder.mkdir()
    np.save(folder / "x.npy", np.ones((2, 4), np.float32))
    (folder / "x.ids.txt").write_text("a\nb\n")
    line = error_line(run("import-vectors", "--vectors", folder / "x.npy", "--out", folder, "--overwrite"))
    assert "holds the input" in line and (folder / "x.npy").exists()


def test_embed_overwrite_replaces_the_folder_whole(world, tmp_path):
    root, run_dir, _, wavs = world
    out = tmp_path / "emb"
    model = run_dir / "model.pt"
    assert run("embed", "--model", model, *wavs, "--out", out).exit_code == 0
    before = sorted(p.name for p in out.rglob("*.npy"))
    assert len(before) == 2
    assert run("embed", "--model", model, wavs[0], "--out", out, "--overwrite").exit_code == 0
    after = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert len(after) == 1 and (out / "ids.txt").read_text().split() == [wavs[0].as_posix()]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    line = error_line(run("embed", "--model", model, wavs[0], "--out", theirs, "--overwrite"))
    assert "not written by 'mrlcache embed'" in line and (theirs / "notes.txt").exists()


def test_the_guard_knows_every_file_of_a_cache():
    from mrlcache.cache import format as fmt
    from mrlcache.extract.run import BACKBONE_FILE

    assert {fmt.META_FILE, fmt.MANIFEST_FILE, fmt.SKIPPED_FILE, fmt.SOURCES_FILE, BACKBONE_FILE} == set(CACHE_FILES)


def test_demo_deletes_only_a_folder_it_can_prove_it_wrote(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a previous demo"):
        prepare_out(out)
    (out / "demo.json").write_text(json.dumps({"files": {"results.json": 2}}))
    (out / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="not the ones it wrote: thesis.tex"):
        prepare_out(out)
    assert (out / "thesis.tex").read_text() == "years of work"
    (out / "results.json").write_text("{ }")  # a file the demo wrote, changed since
    (out / "thesis.tex").unlink()
    with pytest.raises(ValueError, match="results.json"):
        prepare_out(out)
    (out / "results.json").write_text("{}")
    prepare_out(out)  # exactly what it wrote: cleared
    assert list(out.iterdir()) == []


def test_a_planted_link_never_redirects_a_write(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.chmod(victim, 0o600)
    out = tmp_path / "shared"
    out.mkdir()
    for name in (f".report.json.tmp-{os.getpid()}", ".report.json.tmp-0"):  # the names used before
        (out / name).symlink_to(victim)
    runtime.atomic_write(out / "report.json", "new")
    assert victim.read_text() == "keep" and (victim.stat().st_mode & 0o777) == 0o600
    assert (out / "report.json").read_text() == "new" and not (out / "report.json").is_symlink()
    fd, tmp = runtime.temp_file(out / "x")
    os.close(fd)
    assert tmp.parent == out and tmp.name.startswith(".x.tmp-") and not tmp.is_symlink()


@pytest.mark.parametrize("fmt, out, index", [("npy", "emb.npy", "emb.npy"), ("kaldi", "emb", "emb.scp")])
def test_an_interrupted_pair_write_never_pairs_new_vectors_with_old_ids(tmp_path, monkeypatch, fmt, out, index):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_vectors(["a", "b", "c"], x, fmt, tmp_path / out)
    real = os.replace

    def interrupted(src, dst):
        if os.path.basename(dst) == index:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_vectors(["x", "y", "z"], x + 100, fmt, tmp_path / out, overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    assert not (tmp_path / index).exists()  # no index: the set cannot be read as a mix of old and new
    with pytest.raises(InteropError, match="no such file"):
        read_vectors(tmp_path / index)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # temporary files cleaned up
