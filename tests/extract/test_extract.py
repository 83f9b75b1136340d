"""The extract pass: exact vectors, messy corpora, resume, ranks, backends (b0, tiny corpora)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import broken_files, make_tree

import mrlcache.cache
from mrlcache.audio import load_audio
from mrlcache.augment import AugmentConfig, Augmenter, make_view
from mrlcache.cli import main
from mrlcache.backbone.loading import load_backbone

pytestmark = pytest.mark.slow

COMMON = ["--random-init", "--variant", "b0", "--views", "2", "--crop-seconds", "1.0", "--dtype", "float32",
          "--workers", "0", "--quiet", "--seed", "3", "--threads", "1"]
# One model thread everywhere: CPU kernels reduce in a thread-count-dependent order, so
# caches are bit-identical for equal thread counts (torchrun gives each process one).


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(args, ok=True):
    result = CliRunner().invoke(main, ["extract", *args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def cli_subprocess(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mrlcache", "extract", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_tree(root, speakers=3, videos=2, utts=2, seconds=1.3, formats=("wav", "flac", "m4a"),
              rates=(16000, 8000, 22050, 44100, 48000))
    make_tree(root / "stereo", speakers=1, videos=1, utts=2, seconds=1.2, channels=2, rates=(44100,))
    return root


def test_cached_vectors_equal_the_model_on_the_same_crops(corpus, tmp_path):
    out = tmp_path / "cache"
    run(["--data", str(corpus), "--out", str(out), "--shard-size", "5", *COMMON])
    cache = mrlcache.cache.open(out)
    model = load_backbone("b0", random_init=True, seed=3)
    assert model.weights_sha256 is None
    saved = load_backbone(str(out / "backbone.pt"))
    assert cache.meta["backbone"] == {"source": "random-init:b0", "train_type": None, "dataset": None,
                                      "sha256": saved.weights_sha256}
    augmenter = Augmenter(AugmentConfig())
    pooled = cache.read("pooled")  # (N, V, D)
    assert pooled.shape == (len(cache.utterances), 2, model.pooled_dim)
    for i in (0, 5, len(cache.utterances) - 1):
        utt = cache.utterances[i]
        wave = load_audio(corpus / utt)
        crops = np.stack([make_view(wave, utt, v, seed=3, crop_samples=16000, augmenter=augmenter) for v in range(2)])
        with torch.inference_mode():
            expected = model.pooled(torch.from_numpy(crops)).numpy()
        np.testing.assert_allclose(pooled[i], expected, rtol=1e-4, atol=1e-5)
    # Views differ (augmented) and utterances differ.
    assert not np.allclose(pooled[:, 0], pooled[:, 1])
    assert cache.speakers[0] == cache.utterances[0].split("/")[0]


def test_broken_files_are_recorded_not_dropped(corpus, tmp_path):
    data = tmp_path / "data"
    make_tree(data, speakers=2, videos=1, utts=2, seconds=1.2)
    expected = {str(p.relative_to(data)): reason for p, reason in broken_files(data).items()}
    out = tmp_path / "cache"
    result = run(["--data", str(data), "--out", str(out), "--shard-size", "3", *COMMON])
    cache = mrlcache.cache.open(out)
    assert cache.skipped == expected
    assert len(cache.utterances) == 4
    assert not set(cache.utterances) & set(expected)
    summary = cache.meta["summary"]
    assert summary["skipped"] == len(expected)
    assert summary["skipped_by_reason"] == {r: 1 for r in expected.values()}
    assert summary["skipped_files"] == expected  # named, not only counted
    rows = [line.split("\t") for line in (out / "skipped.tsv").read_text().splitlines()]
    assert rows[0] == ["utt_id", "reason", "path"]
    assert {u: (r, p) for u, r, p in rows[1:]} == {u: (r, str(data / u)) for u, r in expected.items()}
    assert "truncated: 1" in result.output and "skipped.tsv" in result.output


def test_zarr_and_hdf5_hold_the_same_numbers(corpus, tmp_path):
    run(["--data", str(corpus), "--out", str(tmp_path / "z"), "--shard-size", "4", *COMMON])
    run(["--data", str(corpus), "--out", str(tmp_path / "h"), "--format", "hdf5", "--shard-size", "4", *COMMON])
    z, h = mrlcache.cache.open(tmp_path / "z"), mrlcache.cache.open(tmp_path / "h")
    assert z.utterances == h.utterances
    np.testing.assert_array_equal(z.read("pooled"), h.read("pooled"))


def test_eval_mode_uses_whole_utterances(corpus, tmp_path):
    out = tmp_path / "eval"
    run(["--data", str(corpus), "--out", str(out), "--mode", "eval", "--max-seconds", "1.0",
         *[a for a in COMMON if a not in ("--views", "2")]])
    cache = mrlcache.cache.open(out)
    assert cache.num_views == 1 and cache.meta["mode"] == "eval"
    model = load_backbone(str(tmp_path / "eval" / "backbone.pt"))
    utt = cache.utterances[2]
    wave = load_audio(corpus / utt)[:16000]
    with torch.inference_mode():
        expected = model.pooled(torch.from_numpy(wave)[None]).numpy()[0]
    np.testing.assert_allclose(cache.read("pooled", view=0)[2], expected, rtol=1e-4, atol=1e-5)


def test_other_settings_are_refused_and_overwrite_starts_over(corpus, tmp_path):
    out = tmp_path / "cache"
    run(["--data", str(corpus), "--out", str(out), *COMMON])
    result = run(["--data", str(corpus), "--out", str(out), *COMMON, "--crop-seconds", "1.5"], ok=False)
    assert result.exit_code != 0 and "crop_seconds" in result.output and "--overwrite" in result.output
    run(["--data", str(corpus), "--out", str(out), *COMMON, "--crop-seconds", "1.5", "--overwrite"])
    assert mrlcache.cache.open(out).meta["crop_seconds"] == 1.5


def test_bad_input_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "c"), *COMMON], ok=False)
    assert result.exit_code != 0 and "empty" in result.output
    assert not (tmp_path / "c" / "cache.json").exists()
    result = run(["--data", str(tmp_path), "--out", str(tmp_path / "c"), "--weights", str(tmp_path / "empty")], ok=False)
    assert result.exit_code != 0
    make_tree(tmp_path / "one", speakers=1, videos=1, utts=1, seconds=1.0)
    result = run(["--data", str(tmp_path / "one"), "--out", str(tmp_path / "c"), *COMMON, "--device", "gpu7"], ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output  # 2: click's bad option value
    assert result.output.strip().splitlines()[-1] == (
        "Error: Invalid value for '--device': 'gpu7': not a device; use auto, cpu, cuda or cuda:N")
    assert not (tmp_path / "c" / "cache.json").exists()


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    make_tree(data, speakers=4, videos=2, utts=3, seconds=1.2)  # 24 utterances, 12 shards
    args = ["--data", str(data), "--shard-size", "2", "--batch-size", "2", *COMMON]
    run([*args, "--out", str(tmp_path / "whole")])

    killed = tmp_path / "killed"
    proc = cli_subprocess([*args, "--out", str(killed)])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((killed / "shards").glob("shard-*.zarr"))) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((killed / "shards").glob("shard-*.zarr")))
    assert 2 <= written < 12, f"the kill came too late to test resuming ({written} shards)"
    with pytest.raises(mrlcache.cache.IncompleteCacheError):
        mrlcache.cache.open(killed)

    run([*args, "--out", str(killed)])
    a, b = mrlcache.cache.open(tmp_path / "whole"), mrlcache.cache.open(killed)
    assert a.utterances == b.utterances
    np.testing.assert_array_equal(a.read("pooled"), b.read("pooled"))


def test_two_processes_equal_one(corpus, tmp_path):
    args = ["--data", str(corpus), "--shard-size", "3", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "mrlcache", "extract", *args, "--out", str(tmp_path / "one")],
                   env=env, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                "-m", "mrlcache", "extract", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    one, two = mrlcache.cache.open(tmp_path / "one"), mrlcache.cache.open(tmp_path / "two")
    assert one.utterances == two.utterances
    np.testing.assert_array_equal(one.read("pooled"), two.read("pooled"))
    assert two.meta["summary"]["utterances"] == len(one.utterances)
    # Without torchrun: --rank/--world-size, ranks side by side, either order.
    for rank in (1, 0):
        run([*args, "--out", str(tmp_path / "manual"), "--rank", str(rank), "--world-size", "2"])
    np.testing.assert_array_equal(mrlcache.cache.open(tmp_path / "manual").read("pooled"), one.read("pooled"))


def test_setup_errors_leave_no_cache(corpus, tmp_path):
    (tmp_path / "noise").mkdir()
    out = tmp_path / "cache"
    result = run(["--data", str(corpus), "--out", str(out), *COMMON, "--noise-dir", str(tmp_path / "noise")], ok=False)
    assert result.exit_code != 0 and "noise" in result.output and "Traceback" not in result.output
    assert not out.exists()
    result = run(["--data", str(corpus), "--out", str(out), *COMMON, "--overwrite", "--rank", "0", "--world-size", "2"],
                 ok=False)
    assert result.exit_code != 0 and "torchrun" in result.output
    assert not out.exists()


def test_rerun_of_a_complete_cache_keeps_its_summary(corpus, tmp_path):
    out = tmp_path / "cache"
    run(["--data", str(corpus), "--out", str(out), *COMMON])
    first = mrlcache.cache.open(out).meta["summary"]
    assert first["utterances_per_second"] > 0
    run(["--data", str(corpus), "--out", str(out), *COMMON])
    assert mrlcache.cache.open(out).meta["summary"] == first


def test_eval_mode_refuses_views_and_records_one(corpus, tmp_path):
    args = ["--data", str(corpus), "--out", str(tmp_path / "e"), "--mode", "eval", "--random-init", "--variant", "b0",
            "--workers", "0", "--quiet", "--threads", "1", "--max-seconds", "0.6"]
    result = run([*args, "--views", "3"], ok=False)
    assert result.exit_code != 0 and "--views does not apply" in result.output
    run(args)
    assert "views: 1" in (tmp_path / "e" / "extract-config.yaml").read_text()


def test_eval_mode_warns_about_a_very_long_file_in_one_pass_and_names_the_cap(tmp_path, monkeypatch):
    import mrlcache.extract.run as extract_run

    make_tree(tmp_path / "data", speakers=1, videos=1, utts=2, seconds=1.5)
    monkeypatch.setattr(extract_run, "LONG_SECONDS", 1.0)  # stands for minutes-long files
    common = [a for a in COMMON if a not in ("--views", "2", "--crop-seconds", "1.0")]
    result = run(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"), "--mode", "eval",
                  "--window-seconds", "none", *common])
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("--max-seconds" in w and "--window-seconds none" in w for w in warnings)
    result = run(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "d"), "--mode", "eval",
                  "--max-seconds", "1", "--window-seconds", "none", *common])
    assert "warning:" not in result.output


def test_eval_mode_embeds_long_files_window_by_window_and_records_them(tmp_path):
    from mrlcache.streams import windows

    make_tree(tmp_path / "data", speakers=2, videos=1, utts=1, seconds=1.4)
    make_tree(tmp_path / "data" / "long", speakers=1, videos=1, utts=1, seconds=3.7)
    common = [a for a in COMMON if a not in ("--views", "2", "--crop-seconds", "1.0")]
    out = tmp_path / "c"
    result = run(["--data", str(tmp_path / "data"), "--out", str(out), "--mode", "eval", "--window-seconds", "1.5",
                  *common])
    cache = mrlcache.cache.open(out)
    (long_id,) = [u for u in cache.utterances if u.startswith("long/")]
    assert cache.meta["window_seconds"] == 1.5
    assert cache.meta["summary"]["windowed_files"] == {long_id: 3}
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and long_id in notes[0] and "3 windows" in notes[0]
    assert "1 long files" in result.output  # the end-of-run table
    model = load_backbone(str(out / "backbone.pt"))
    torch.set_num_threads(1)
    for utt in cache.utterances:
        wave = torch.from_numpy(load_audio(tmp_path / "data" / utt))[None]
        with torch.no_grad():
            want = windows.pooled(model, wave, 1.5)[0].numpy()
            whole = model.pooled(wave)[0].numpy()
        got = cache.read("pooled", view=0, rows=[cache.index_of([utt])[0]])[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert np.allclose(got, whole, rtol=1e-5, atol=1e-6) == (utt != long_id)  # only the long file differs
    # The window is a setting of the vectors: a rerun with another one is refused.
    result = run(["--data", str(tmp_path / "data"), "--out", str(out), "--mode", "eval", "--window-seconds", "2",
                  *common], ok=False)
    assert result.exit_code != 0 and "window_seconds" in result.output


def test_window_seconds_in_train_mode_is_refused(tmp_path):
    make_tree(tmp_path / "data", speakers=1, videos=1, utts=1, seconds=1.0)
    result = run(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"), "--window-seconds", "10",
                  "--random-init", "--variant", "b0", "--quiet"], ok=False)
    assert result.exit_code == 2 and "--window-seconds applies to --mode eval" in result.output
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("value", ["0.5", "0", "-3", "soon"])
def test_window_seconds_below_a_second_or_not_a_number_is_refused(tmp_path, value):
    make_tree(tmp_path / "data", speakers=1, videos=1, utts=1, seconds=1.0)
    result = run(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"), "--mode", "eval",
                  "--window-seconds", value, "--random-init", "--variant", "b0", "--quiet"], ok=False)
    assert result.exit_code == 2 and "--window-seconds" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()
