"""Bad input gets one line naming the option (or file) and the fix, never a traceback.

Each case of issue 11 items 4-5 for extract, eer, embed, demo, make-corpus and --config.
"""

import errno
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tree, speech_like, write_wav, error_line
from test_eer_cli import _model_file

from mrlcache.audio import MIN_SAMPLES, SAMPLE_RATE
from mrlcache.cli import main, options


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_tree(root, speakers=2, videos=1, utts=1, seconds=0.5)
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    _model_file(path, backbone_seed=0)
    return path


@pytest.mark.parametrize("args, message", [
    (["--max-seconds", "-1"], "'--max-seconds': -1 is not a finite number >= 0.02 (seconds)"),
    (["--max-seconds", "0"], "'--max-seconds': 0 is not a finite number >= 0.02 (seconds)"),
    (["--min-seconds", "0"], "'--min-seconds': 0 is not a finite number > 0 (seconds)"),
    (["--min-seconds", "-0.5"], "'--min-seconds': -0.5 is not a finite number > 0 (seconds)"),
    (["--crop-seconds", "0"], "'--crop-seconds': 0 is not a finite number > 0 (seconds)"),
    (["--threads", "0"], "'--threads': 0 is not an integer >= 1"),
    (["--workers", "-1"], "'--workers': -1 is not an integer >= 0"),
    (["--views", "0"], "'--views': 0 is not an integer >= 1"),
    (["--seed", "-3"], "'--seed': -3 is not an integer >= 0"),
    (["--device", "gpu7"], "'--device': 'gpu7': not a device; use auto, cpu, cuda or cuda:N"),
])
def test_extract_refuses_bad_values(data, tmp_path, args, message):
    result = run("extract", "--data", data, "--out", tmp_path / "c", "--random-init", "--variant", "b0", *args)
    assert message in error_line(result)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["eer", "embed"])
@pytest.mark.parametrize("args, message", [
    (["--device", "gpu7"], "'--device': 'gpu7': not a device"),
    (["--max-seconds", "0"], "'--max-seconds': 0 is not a finite number >= 0.02 (seconds)"),
])
def test_eer_and_embed_refuse_bad_values(data, model, tmp_path, command, args, message):
    where = ["--trials", model, "--cache", data] if command == "eer" else [data, "--out", tmp_path / "e.npy"]
    assert message in error_line(run(command, "--model", model, *where, *args))


def test_demo_and_make_corpus_refuse_bad_values(tmp_path):
    assert "'--seed': -1 is not an integer >= 0 and <= 4294967295" in error_line(run("demo", "--out", tmp_path / "d", "--seed", "-1"))
    line = error_line(run("make-corpus", tmp_path / "c", "--max-seconds", "0"))
    assert "'--max-seconds': 0 is not a finite number >= 0.1 (seconds)" in line


def test_the_smallest_cap_leaves_the_model_enough_samples():
    assert options.CAP.range.lo * SAMPLE_RATE >= MIN_SAMPLES


@pytest.mark.parametrize("text, message", [
    ("views: 2\nviews: 3\n", ":2: not valid YAML: duplicate key 'views' on lines 1 and 2"),
    ("crop-seconds: 1\ncrop_seconds: 2\n", "'crop-seconds' and 'crop_seconds' set the same option"),
    ("min-seconds: [1, 2]\n", "min-seconds: expected a single value, got a list"),
    ("device: {name: cpu}\n", "device: expected a single value, got a mapping"),
])
def test_config_files_refuse_duplicates_and_lists(data, tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    line = error_line(run("extract", "--config", cfg, "--data", data, "--out", tmp_path / "c"))
    assert message in line and str(cfg) in line


def test_a_repeatable_option_takes_one_value_or_a_list(tmp_path):
    from mrlcache.config import read_yaml_options

    cfg = tmp_path / "c.yaml"
    cfg.write_text("baseline: raw\n")
    assert read_yaml_options(cfg, main.commands["eer"]) == {"baselines": ["raw"]}
    cfg.write_text("baseline: [raw, pca]\n")
    assert read_yaml_options(cfg, main.commands["eer"]) == {"baselines": ["raw", "pca"]}


@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "free some space"), (errno.EROFS, "read-only"),
                                        (errno.ELOOP, "symbolic link")])
def test_an_os_error_is_one_line_naming_the_path_and_debug_shows_it(data, tmp_path, monkeypatch, code, hint):
    import mrlcache.corpus

    def fail(root):
        raise OSError(code, "simulated", str(tmp_path / "where" / "it.happened"))

    monkeypatch.setattr(mrlcache.corpus, "scan_tree", fail)
    args = ["extract", "--data", data, "--out", tmp_path / "c", "--random-init", "--variant", "b0"]
    line = error_line(run(*args))
    assert f"{tmp_path / 'where' / 'it.happened'}: simulated; " in line and hint in line
    result = run("--debug", *args)
    assert isinstance(result.exception, OSError) and result.exception.errno == code


def test_embed_never_writes_outside_its_folder(model, tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    write_wav(tmp_path / "victim.wav", speech_like(0.5), SAMPLE_RATE)
    monkeypatch.chdir(work)
    line = error_line(run("embed", "--model", model, "../../victim.wav", "--out", "embs"))
    assert "input ../../victim.wav: its embedding would be written outside --out embs" in line
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["victim.wav"]


def test_embed_never_lets_two_inputs_share_an_output_file(model, tmp_path, monkeypatch):
    wave = speech_like(0.5)
    write_wav(tmp_path / "x.wav", wave, SAMPLE_RATE)
    write_wav(tmp_path / "x.flac", wave, SAMPLE_RATE)
    monkeypatch.chdir(tmp_path)
    line = error_line(run("embed", "--model", model, "x.wav", "x.flac", "--out", "embs"))
    assert "inputs x.wav and x.flac would both be written to embs/x.npy" in line
    assert not (tmp_path / "embs").exists()


@pytest.mark.slow
def test_embed_refuses_a_file_too_short_for_the_model_and_warns_on_silence(model, tmp_path):
    short = write_wav(tmp_path / "short.wav", speech_like(1.0)[:MIN_SAMPLES - 1], SAMPLE_RATE)
    line = error_line(run("embed", "--model", model, short, "--out", tmp_path / "e.npy"))
    assert f"{short}: too_short: {MIN_SAMPLES - 1} samples" in line
    silent = write_wav(tmp_path / "silent.wav", np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    result = run("embed", "--model", model, silent, "--out", tmp_path / "e.npy")
    assert result.exit_code == 0, result.output
    assert f"warning: {silent}: digital silence" in result.output
    assert np.load(tmp_path / "e.npy").shape == (1, 8)


@pytest.mark.slow
def test_extract_records_a_file_too_short_for_the_model_whatever_min_seconds_says(tmp_path):
    data = tmp_path / "data"
    make_tree(data, speakers=2, videos=1, utts=1, seconds=0.5)
    write_wav(data / "id10001" / "v00" / "tiny.wav", speech_like(1.0)[:MIN_SAMPLES - 1], SAMPLE_RATE)
    result = run("extract", "--data", data, "--out", tmp_path / "c", "--random-init", "--variant", "b0",
                 "--mode", "eval", "--min-seconds", "0.001", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output + repr(result.exception)
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta["summary"]["skipped_by_reason"] == {"too_short": 1}, meta["summary"]


@pytest.mark.slow
def test_verify_refuses_a_file_too_short_for_the_model_and_digital_silence(model, tmp_path):
    # A decision about a file with no speaker in it is no decision: refused, as extract skips it.
    voice = write_wav(tmp_path / "voice.wav", speech_like(1.0), SAMPLE_RATE)
    short = write_wav(tmp_path / "short.wav", speech_like(1.0)[:MIN_SAMPLES - 1], SAMPLE_RATE)
    line = error_line(run("verify", "--model", model, short, voice))
    assert f"{short}: too_short: {MIN_SAMPLES - 1} samples" in line
    silent = write_wav(tmp_path / "silent.wav", np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    line = error_line(run("verify", "--model", model, voice, silent))
    assert f"{silent}: silent: peak 0.0e+00 is below 1e-04 (digital silence)" in line


@pytest.mark.slow
@pytest.mark.parametrize("out, fmt, made", [("e.npy", "npy", "e.npy"), ("embs", "npy", "embs"),
                                            ("e", "kaldi", "e.scp"), ("e.npz", "npz", "e.npz")])
def test_embed_keeps_existing_outputs_unless_overwrite(model, tmp_path, monkeypatch, out, fmt, made):
    # As export-vectors: an embedding run can cost hours, so a second run never replaces it silently.
    monkeypatch.chdir(tmp_path)
    write_wav(tmp_path / "a.wav", speech_like(0.5), SAMPLE_RATE)
    first = run("embed", "--model", model, "a.wav", "--out", out, "--format", fmt)
    assert first.exit_code == 0, first.output
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    write_wav(tmp_path / "b.wav", speech_like(0.7), SAMPLE_RATE)
    line = error_line(run("embed", "--model", model, "b.wav", "--out", out, "--format", fmt))
    assert made in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and p.name != "b.wav"} == before
    again = run("embed", "--model", model, "b.wav", "--out", out, "--format", fmt, "--overwrite")
    assert again.exit_code == 0, again.output
