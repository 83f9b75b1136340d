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
