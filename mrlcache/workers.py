"""Decoding workers (DataLoader processes of extract and the end-to-end fit): they end with
their parent, and a worker that died is one line, never a traceback."""

from __future__ import annotations

import contextlib
import os


def die_with_parent(parent_pid: int) -> None:
    """Make this worker process end when ``parent_pid`` does, even on ``kill -9`` of it.

    Linux: the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``).
    Elsewhere, or if that call fails: a daemon thread checks the parent every second.
    Either way a worker whose parent is already gone exits at once.
    """
    import signal
    import sys
    import threading
    import time

    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


@contextlib.contextmanager
def worker_deaths(error, hint: str):
    """Code consuming a DataLoader: a decoding worker that died (killed, out of memory) is one line.

    torch raises ``RuntimeError: DataLoader worker (pid N) is killed by signal ...`` from the
    iterator or from its SIGCHLD handler, wherever the main process is (in a forward, say);
    that becomes ``error(message)`` naming the worker and ``hint`` (how to resume), never a
    traceback. Other errors pass through.
    """
    try:
        yield
    except RuntimeError as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "DataLoader worker" not in text:
            raise
        raise error(f"{text.rstrip('. ')} (the system kills a worker when memory runs out); {hint}") from None


def surviving_workers(batches, error, hint: str):
    """Iterate a DataLoader, a dead worker one line (:func:`worker_deaths`)."""
    with worker_deaths(error, hint):
        yield from batches
