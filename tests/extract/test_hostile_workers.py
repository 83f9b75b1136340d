"""A decoding worker dies with its parent: kill -9 of the process leaves no worker running.

The parent is a subprocess that iterates a DataLoader with extract's own worker_init over
a dataset whose items take ten minutes to decode; it is killed with SIGKILL once its worker
runs, and the worker must be gone within seconds (before: it decoded on for hours).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import functools, os, sys, time
    import torch
    from mrlcache.extract.data import worker_init

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            print("worker", os.getpid(), flush=True)
            time.sleep(600)  # a decode that never ends on its own
            return i

    loader = torch.utils.data.DataLoader(Slow(), num_workers=1, collate_fn=lambda x: x,
                                         worker_init_fn=functools.partial(worker_init, parent=os.getpid()))
    for _ in loader:
        pass
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_dies_when_extract_is_killed():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = parent.stdout.readline()  # the worker is decoding
        assert line.startswith("worker"), line
        worker = int(line.split()[1])
        assert _alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the decoding worker outlived its killed parent"
    finally:
        parent.kill()
        if "worker" in locals() and _alive(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "nice"), reason="os.nice")
def test_on_the_cpu_decoding_workers_run_at_worker_nice(tmp_path, monkeypatch):
    """With WORKER_NICE set (19 here; bench_extract.py --nices sets it), a worker decodes at
    that niceness relative to extract (capped at 19); the vectors are the same as without workers."""
    import numpy as np
    import torch
    from conftest import TINY, make_tree

    import mrlcache.cache
    from mrlcache.backbone import state_sha256
    from mrlcache.backbone.redimnet import ReDimNet
    from mrlcache.corpus import scan_tree
    from mrlcache.extract import ExtractConfig, data, extract

    torch.manual_seed(0)
    model = ReDimNet(TINY).eval()
    model.weights_sha256 = state_sha256(model)
    make_tree(tmp_path / "data", speakers=2, videos=1, utts=2, seconds=0.5)
    seen = tmp_path / "niceness"
    real = data.UtteranceViews.__getitem__

    def noting(self, row):  # runs in the worker (forked with this patch)
        with open(seen, "a") as f:
            f.write(f"{os.getpid()} {os.nice(0)}\n")
        return real(self, row)

    monkeypatch.setattr(data.UtteranceViews, "__getitem__", noting)
    monkeypatch.setattr(data, "WORKER_NICE", 19)
    utts = scan_tree(tmp_path / "data")
    pooled = {}
    for workers in (1, 0):
        cfg = ExtractConfig.of(views=2, crop_seconds=0.5, dtype="float32", shard_size=2, device="cpu", workers=workers)
        extract(utts, model, tmp_path / f"cache{workers}", cfg, progress=False)
        pooled[workers] = mrlcache.cache.open(tmp_path / f"cache{workers}").read("pooled")
    lines = [line.split() for line in seen.read_text().splitlines()]
    in_worker = {int(n) for pid, n in lines if int(pid) != os.getpid()}
    in_extract = {int(n) for pid, n in lines if int(pid) == os.getpid()}  # workers=0 decodes here
    assert in_extract == {os.nice(0)}
    assert in_worker == {min(19, os.nice(0) + 19)}
    np.testing.assert_array_equal(pooled[1], pooled[0])
