"""fit on 2 processes (gloo, CPU): 2 ranks x batch B train as 1 process x batch 2B, a lost
rank stops the other with a message, and a fit resumes on another number of ranks."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_fit import write_synth_cache

from mrlcache.fit import FitError, fit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("ddp_runner.py")
DIMS = (4, 8, 16, 32)
# 24 speakers x 6 utterances, 4 held out: 120 training rows = 3 batches of 32 + a last one of 24.
OPTS = dict(epochs=4, lr=1e-2, warmup_epochs=1, margin_warmup_epochs=2, scale=16, val_speakers=4,
            head_only=True, progress=False)
TIMING = ("seconds", "samples_per_s")


def _env() -> dict:
    # One thread per rank (as torchrun sets), passive waiting: the ranks share 2 cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def torchrun(*args, n=2, timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *map(str, args)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]  # the ranks' own tracebacks, not only torchrun's summary
    return done


def spec_file(tmp_path, name, cache, out, options, **more) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"cache": str(cache), "dims": list(DIMS), "out": str(out), "options": options,
                                **more}))
    return path


def history(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "history.jsonl").read_text().splitlines()]


def assert_same_curve(one, two, rtol=2e-4, eer_tol=0.01):
    """The loss, accuracy, validation EER and learning rate of every epoch agree (an EER on
    a few held-out trials may move by one trial where two scores are within rounding)."""
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a["epoch"] == b["epoch"] and a["samples"] == b["samples"]
        for d in map(str, DIMS):
            assert b["loss"][d] == pytest.approx(a["loss"][d], rel=rtol), (a["epoch"], d)
            assert b["accuracy"][d] == pytest.approx(a["accuracy"][d], abs=1e-6)
            if "val_eer" in a:
                assert b["val_eer"][d] == pytest.approx(a["val_eer"][d], abs=eer_tol)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)


def assert_same_weights(one, two, atol=1e-4):
    a, b = (torch.load(Path(r) / "last.pt", weights_only=True) for r in (one, two))
    for part in ("head", "loss"):
        for k, v in a[part].items():
            if v.is_floating_point():
                assert torch.allclose(v, b[part][k], atol=atol, rtol=1e-3), (part, k)


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_synth_cache(root / "cache", n_spk=24, utts=6, views=2, seed=1)
    return root


@pytest.fixture(scope="module")
def reference(pooled):
    """The one-process fits with batch 32: features in memory and streamed."""
    return {"memory": fit(pooled / "cache", DIMS, pooled / "ref-memory", batch_size=32, **OPTS),
            "streamed": fit(pooled / "cache", DIMS, pooled / "ref-streamed", batch_size=32, memory_gb=1e-5, **OPTS)}


def test_torchrun_fit_on_two_ranks_trains_as_one_process_with_the_doubled_batch(pooled, reference, tmp_path):
    run = tmp_path / "run"
    done = torchrun("-m", "mrlcache", "fit", "--cache", pooled / "cache", "--out", run,
                    "--dims", ",".join(map(str, DIMS)), "--batch-size", 16, "--epochs", 4, "--lr", 0.01,
                    "--warmup-epochs", 1, "--margin-warmup-epochs", 2, "--scale", 16, "--val-speakers", 4,
                    "--head-only", "--quiet")
    assert done.stdout.count("model.pt") == 1  # rank 0 reports the run, once
    assert_same_curve(history(reference["memory"]), history(run))
    assert_same_weights(reference["memory"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["world_size"], config["optim"]["batch_size"], config["effective_batch"]) == (2, 16, 32)
    assert all((h["world_size"], h["effective_batch"]) == (2, 32) for h in history(run))
    one = yaml.safe_load((reference["memory"] / "config.yaml").read_text())
    assert (one["world_size"], one["effective_batch"]) == (1, 32)
    assert "world_size" not in history(reference["memory"])[0]  # one process: history as before
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["epoch"] == json.loads((reference["memory"] / "summary.json").read_text())["best"]["epoch"]


def test_streamed_features_on_two_ranks_train_as_one_process(pooled, reference, tmp_path):
    run = tmp_path / "run"
    torchrun(RUNNER, spec_file(tmp_path, "s", pooled / "cache", run, dict(OPTS, batch_size=16, memory_gb=1e-5)))
    assert json.loads((run / "fingerprint.json").read_text())["features"] == "streamed"
    assert_same_curve(history(reference["streamed"]), history(run))
    assert_same_weights(reference["streamed"], run)


def test_stream_model_with_batchnorm_on_two_ranks_trains_as_one_process(tmp_path):
    # Encoders with BatchNorm over layer and fbank frames, a concat fusion: the statistics of
    # each step are over the global batch (synchronised BatchNorm), as on one process.
    from stream_standin import stream_cache

    # No validation: the model is the last epoch's (a held-out EER on a few trials may pick
    # another epoch where two scores are within rounding). SGD: a bias that BatchNorm centres
    # away has only rounding noise for gradient, which AdamW's normalised step would turn
    # into a drift of its own in each run (and eval-mode outputs follow it).
    opts = dict(OPTS, epochs=2, inputs="layers,fbank", fusion="concat", encoder_dim=16, val_speakers=0,
                optimizer="sgd", lr=0.01)
    args = dict(speakers=16, utts=6, views=2, seed=0)
    one = fit(stream_cache(**args), DIMS, tmp_path / "one", batch_size=16, **opts)
    two = tmp_path / "two"
    torchrun(RUNNER, spec_file(tmp_path, "m", "streams", two, dict(opts, batch_size=8), cache_args=args))
    assert_same_curve(history(one), history(two))
    # The models embed alike.
    from mrlcache.model import load_model

    cache = stream_cache(**args)
    batch = {k: cache.read(k, view=1, rows=np.arange(24)) for k in ("layers", "fbank")}
    a, b = (load_model(r / "model.pt").project(batch) for r in (one, two))
    np.testing.assert_allclose(b, a, atol=2e-3 * np.abs(a).max())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_stops_the_other_with_a_message_and_the_fit_resumes_on_one_process(pooled, reference,
                                                                                        tmp_path):
    # Two processes as torchrun starts them, without torchrun's agent (which would stop the
    # survivor itself): rank 1 dies in epoch 3 (4 steps per epoch), after epoch 2's last.pt.
    run = tmp_path / "run"
    spec = spec_file(tmp_path, "k", pooled / "cache", run, dict(OPTS, batch_size=16, dist_timeout=60),
                     kill_rank=1, kill_at_step=10)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, RUNNER, spec], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env={**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    t0 = time.monotonic()
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -9
    assert procs[0].returncode not in (0, None)
    assert "RankLostError" in errors[0] and "another rank stopped" in errors[0], errors[0][-2000:]
    assert "during epoch 3" in errors[0] and "--resume" in errors[0], errors[0][-2000:]
    assert time.monotonic() - t0 < 240
    assert [h["epoch"] for h in history(run)] == [0, 1]
    # Resumed on one process with the same effective batch (32): the curve of the fit that
    # never stopped, up to float rounding.
    fit(pooled / "cache", DIMS, run, resume=True, batch_size=32, **dict(OPTS, dist_timeout=60))
    assert_same_curve(history(reference["memory"]), history(run))
    assert_same_weights(reference["memory"], run)


def test_resume_with_another_effective_batch_is_refused_naming_the_batch_size(pooled, reference, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference["memory"], run)
    with pytest.raises(FitError, match=r"effective batch of 32 .* now 16 .*--batch-size 32"):
        fit(pooled / "cache", DIMS, run, resume=True, batch_size=16, **OPTS)


def test_rank_batches_split_every_global_batch_into_contiguous_parts(monkeypatch):
    from mrlcache import distributed

    order = np.arange(103) * 7
    monkeypatch.setattr(distributed, "world", lambda: 4)
    parts = []
    for r in range(4):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(list(distributed.rank_batches(order, 8)))
    assert {len(p) for p in parts} == {3}  # 103 rows: 2 batches of 32 and a last one of 39 (7 < 2 x 4 joined)
    for step in range(3):
        joined = np.concatenate([parts[r][step] for r in range(4)])
        lo = 32 * step
        assert np.array_equal(joined, order[lo:lo + len(joined)])
        assert max(len(parts[r][step]) for r in range(4)) - min(len(parts[r][step]) for r in range(4)) <= 1
    assert sum(len(parts[r][2]) for r in range(4)) == 103 - 64


def test_end_to_end_on_two_ranks_unfreezes_and_trains_as_one_process(tmp_path):
    """Audio decoded by each rank's DataLoader worker, the backbone unfrozen after epoch 1
    (its BatchNorm then synchronised, DDP re-wrapped), a broken file left out by whichever
    rank read it and listed once by rank 0: the curve of one process with the doubled batch."""
    from conftest import make_tree

    from mrlcache.fit import fit_end_to_end

    data = tmp_path / "data"
    make_tree(data, speakers=3, videos=2, utts=2, seconds=1.0)  # 12 utterances
    broken = sorted(data.glob("id*"))[0] / "v00" / "zz_not_audio.wav"
    broken.write_bytes(b"not audio\n" * 50)
    opts = dict(variant="b0", random_init=True, crop_seconds=0.5, lr=1e-2, val_speakers=0, margin_warmup_epochs=0,
                scale=16, progress=False, views=2, epochs=2, unfreeze_after=1, backbone_lr=1e-3, workers=1,
                optimizer="sgd")
    one = fit_end_to_end(data, (16, 32), tmp_path / "one", batch_size=8, **opts)
    two = tmp_path / "two"
    spec = tmp_path / "e.json"
    spec.write_text(json.dumps({"data": str(data), "dims": [16, 32], "out": str(two),
                                "options": dict(opts, batch_size=4)}))
    torchrun(RUNNER, spec)
    a, b = history(one), history(two)
    assert [h["samples"] for h in b] == [h["samples"] for h in a] == [12, 12]  # 13 files, 1 left out
    for x, y in zip(a, b):
        for d in ("16", "32"):
            assert y["loss"][d] == pytest.approx(x["loss"][d], rel=1e-3)
    assert (two / "skipped.tsv").read_text() == (one / "skipped.tsv").read_text()
    assert json.loads((two / "summary.json").read_text())["skipped"] == 1
    sa, sb = (torch.load(r / "last.pt", weights_only=True)["extra"]["backbone"] for r in (one, two))
    moved = [k for k, v in sa.items() if v.is_floating_point() and "running" not in k]
    assert all(torch.allclose(sa[k], sb[k], atol=1e-4, rtol=1e-3) for k in moved)
