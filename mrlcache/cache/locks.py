"""Rank locks: one writer per rank of a cache, held by that process only.

A POSIX record lock (``fcntl.lockf``) belongs to the process that took it: a forked child
(a DataLoader worker) does not inherit it, and the kernel drops it when the process dies,
even on ``kill -9``, whatever its children do. (``flock`` locks belong to the open file,
which a fork shares, so a killed writer's live workers kept the rank locked.)

Two rules of POSIX locks shape this module: a process can always re-take its own lock, and
closing *any* descriptor of the file drops the process's lock. So the locks this process
holds are kept in ``_HELD`` (keyed by file identity), a second writer of the same rank in
this process is refused from there, and a probe never opens a file this process holds.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

_HELD: dict[tuple[int, int], "RankLock"] = {}  # (st_dev, st_ino) -> lock held by this process
_GUARD = threading.Lock()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class RankLock:
    """An exclusive lock on ``path`` (created if missing) for this process.

    Raises:
        BlockingIOError: another process, or another writer in this one, holds it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = None
        with _GUARD:
            if _identity(self.path) in _HELD:
                raise BlockingIOError(f"{self.path} is held by this process")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:  # EAGAIN or EACCES, depending on the system
                os.close(fd)
                raise BlockingIOError(f"{self.path} is held by another process") from err
            self.fd = fd
            st = os.fstat(fd)
            self.key = (st.st_dev, st.st_ino)
            _HELD[self.key] = self

    def release(self) -> None:
        with _GUARD:
            if self.fd is not None:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None
                _HELD.pop(self.key, None)


def lock_is_free(path: Path) -> bool:
    """True when nobody holds the rank lock at ``path`` (probes by taking and dropping it)."""
    with _GUARD:
        if _identity(path) in _HELD:
            return False
    try:
        RankLock(path).release()
        return True
    except BlockingIOError:
        return False
