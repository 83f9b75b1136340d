"""Fit options: one-line refusals of bad values, CLI defaults from the dataclasses, the run lock."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mrlcache.fit import EndToEndConfig, FitConfig, FitError, fit
from mrlcache.fit.rundir import LOCK_NAME

from test_fit import DIMS, FAST, write_synth_cache


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    write_synth_cache(root / "train", n_spk=12, utts=4, views=2, seed=1)
    return root / "train"


@pytest.mark.parametrize("option, value, message", [
    ("lr", 0.0, "--lr 0.0: must be a finite number > 0 and <= 10"),
    ("lr", -1e-3, "--lr -0.001: must be a finite number > 0"),
    ("scale", 0.0, "--scale 0.0: must be a finite number > 0 and <= 1000"),
    ("margin", -0.1, "--margin -0.1: must be a finite number >= 0 and <= 1.5 (radians)"),
    ("grad_clip", -1.0, "--grad-clip -1.0: must be a finite number >= 0"),
    ("warmup_epochs", -0.5, "--warmup-epochs -0.5: must be a finite number >= 0"),
    ("patience", -1, "--patience -1: must be an integer >= 0"),
    ("memory_gb", 0.0, "--memory-gb 0.0: must be a finite number > 0"),
    ("memory_gb", -2.0, "--memory-gb -2.0: must be a finite number > 0"),
    ("dim_weights", (1.0, -1.0, 1.0, 1.0), "--dim-weights 1.0,-1.0,1.0,1.0: each value must be a finite number >= 0"),
    ("dim_weights", (0.0, 0.0, 0.0, 0.0), "not all zero"),
    ("head", "conformer", "--head conformer: choose one of mrl, ecapa"),
])
def test_bad_values_are_refused_naming_the_option_and_range(train_cache, tmp_path, option, value, message):
    with pytest.raises(FitError) as err:
        fit(train_cache, DIMS, tmp_path / "run", **dict(FAST, **{option: value}))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize("option, value, message", [
    ("workers", -1, "--workers -1: must be an integer >= 0"),
    ("views", 0, "--views 0: must be an integer >= 1"),
    ("grad_accum", 0, "--grad-accum 0: must be an integer >= 1"),
    ("crop_seconds", 0.0, "--crop-seconds 0.0: must be a finite number > 0"),
    ("backbone_lr", 0.0, "--backbone-lr 0.0: must be a finite number > 0"),
])
def test_bad_end_to_end_values_are_refused(tmp_path, option, value, message):
    from mrlcache.fit import fit_end_to_end

    with pytest.raises(FitError, match=message):
        fit_end_to_end(tmp_path / "no-data", (16, 32), tmp_path / "run", variant="b0", random_init=True,
                       **{option: value})
    with pytest.raises(FitError, match="unknown fit option.*workerz"):
        fit_end_to_end(tmp_path / "no-data", (16, 32), tmp_path / "run", variant="b0", workerz=1)
    with pytest.raises(FitError, match="unknown fit option.*workers"):  # end-to-end only
        fit(tmp_path / "no-cache", DIMS, tmp_path / "run", workers=1)


def test_cli_defaults_are_the_dataclass_defaults():
    from mrlcache.augment import AugmentConfig
    from mrlcache.cli.fit import AUGMENT, INVERTED, fit as command

    from mrlcache.components import flat

    fields = {**flat(FitConfig()), **{f.name: f.default for f in dataclasses.fields(EndToEndConfig)}}
    augment = {f.name: f.default for f in dataclasses.fields(AugmentConfig)}
    cli_only = {"cache": None, "out": None, "threads": None, "resume": False, "end_to_end": False, "verify": False}
    import click

    ctx = click.Context(command)
    checked = set()
    for param in command.params:
        if param.name == "config":
            continue
        default = param.get_default(ctx)
        if default is getattr(click.core, "UNSET", None):  # click >= 8.3: no default given
            default = None
        name = INVERTED.get(param.name, param.name)
        if name in cli_only:
            assert default == cli_only[name], name
        elif name in AUGMENT:
            assert default == augment[{"speed_perturb": "speed"}.get(name, name)], name
        elif name == "dims":
            assert tuple(int(v) for v in default.split(",")) == fields["dims"]
        elif name == "inputs":
            assert tuple(default.split(",")) == fields["inputs"]
        elif param.name in INVERTED:  # --quiet: progress=False
            assert default is (not fields[name]), name
        else:
            assert default == fields[name], name
        checked.add(name)
    # Every dataclass option is on the command line (augment: through --noise-dir etc.).
    assert set(fields) - checked == {"augment"}


def test_every_checkpoint_loads_with_weights_only(train_cache, tmp_path):
    run = fit(train_cache, DIMS, tmp_path / "run", **dict(FAST, epochs=2))
    for name in ("best.pt", "last.pt", "model.pt"):
        torch.load(run / name, map_location="cpu", weights_only=True)  # raises on any pickled object
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["config"]["mode"] == "cache" and last["config"]["head"]["dims"] == list(DIMS)


HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mrlcache.fit.rundir import RunLock
    lock = RunLock(Path(sys.argv[1])).acquire()
    if sys.argv[2] == "fork" and os.fork() == 0:  # a child, as a DataLoader worker is
        time.sleep(60)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(60)
""")


def _hold(run, mode="plain"):
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), mode], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_fit_into_a_locked_run_is_refused(train_cache, tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        with pytest.raises(FitError) as err:
            fit(train_cache, DIMS, run, **dict(FAST, epochs=1))
        assert f"{run}: another fit (pid {holder.pid}) is writing this run directory" in str(err.value)
        assert not (run / "history.jsonl").exists()  # nothing of the second fit was written
    finally:
        holder.kill()
        holder.wait()
    # A killed holder leaves no stale lock: the same command now runs.
    fit(train_cache, DIMS, run, **dict(FAST, epochs=1))
    assert (run / LOCK_NAME).exists() and (run / "model.pt").exists()


def test_lock_is_not_inherited_by_forked_workers(train_cache, tmp_path):
    run = tmp_path / "run"
    holder = _hold(run, "fork")
    try:
        holder.kill()  # kill -9 of the fitting process; its forked child lives on
        holder.wait()
        children = subprocess.run(["pgrep", "-s", str(holder.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the forked child should still be alive"
        fit(train_cache, DIMS, run, **dict(FAST, epochs=1))
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
    assert (run / "model.pt").exists()


@pytest.mark.slow
def test_cli_two_fits_into_one_out(train_cache, tmp_path):
    """Two `mrlcache fit` processes into one --out: the second is refused in one line, exit 1."""
    args = [sys.executable, "-m", "mrlcache", "fit", "--cache", str(train_cache), "--dims", "4,8,16,32",
            "--head-only", "--batch-size", "16", "--quiet", "--out", str(tmp_path / "run")]
    first = subprocess.Popen(args + ["--epochs", "400"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "run" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run(args + ["--epochs", "1"], capture_output=True, text=True)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"Error: {tmp_path / 'run'}: another fit (pid {first.pid}) is writing this run directory; "
            "wait for it to end or choose another --out"]
    finally:
        first.kill()
        first.wait()
    bad = subprocess.run(args + ["--epochs", "1", "--threads", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--threads" in bad.stderr and "is not an integer >= 1" in bad.stderr
