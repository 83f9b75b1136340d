"""runtime: glibc serves large buffers from the heap once tuned; OpenMP threads sleep at once unless the
user set otherwise; bf16 on a CPU without it warns once."""

import ctypes
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from mrlcache.runtime import reuse_large_allocations
if sys.argv[1] == "tuned":
    assert reuse_large_allocations()
libc = ctypes.CDLL(None)

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2().hblkhd  # bytes served by mmap
p = libc.malloc(8 << 20)  # an 8 MiB activation
print(libc.mallinfo2().hblkhd - before)
libc.free(p)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc >= 2.33 only")
def test_large_buffers_come_from_the_heap_once_tuned():
    def mmapped(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                             env={**{k: v for k, v in __import__("os").environ.items()
                                                             if not k.startswith("MALLOC_")}})
        return int(out.stdout.split()[-1])

    assert mmapped("default") >= 8 << 20  # glibc's default: a fresh mapping, unmapped on free
    assert mmapped("tuned") == 0


SPIN_PROBE = """
import sys, time
from mrlcache.runtime import passive_openmp
passive_openmp()
import torch
torch.set_num_threads(2)
x = torch.randn(1 << 17)
(x * 2).sum()
cpu = time.process_time()
for _ in range(100):  # a short parallel region, then 5 ms in which torch's other thread waits for the next
    (x * 2).sum()
    time.sleep(0.005)
print(time.process_time() - cpu)  # mostly what the waiting thread burns
"""


def _waiting_cpu(**env) -> float:
    import os

    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", SPIN_PROBE], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's Linux wheels use GNU libgomp")
def test_passive_openmp_makes_torchs_threads_sleep_at_once_unless_the_user_set_otherwise():
    # quiet, 2 cores: about 0.07 s passive (the regions themselves), 0.6 s spinning through the 0.5 s of waits
    assert _waiting_cpu() < 0.15  # extract's and fit's setting reaches torch's libgomp
    assert _waiting_cpu(OMP_WAIT_POLICY="ACTIVE") > 0.25  # the user's policy is kept
    assert _waiting_cpu(GOMP_SPINCOUNT=str(10 ** 9)) > 0.25  # and the user's spin count


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, capsys):
    import torch

    from mrlcache import runtime

    monkeypatch.setattr(runtime, "_WARNED", set())
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("bf16", cpu) == "bf16"
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("bf16", cpu) == "bf16"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "7.5x slower than fp32" in err and "--precision fp32" in err


def test_a_dead_worker_reported_anywhere_in_the_loop_is_one_line():
    """torch's SIGCHLD handler raises in whatever the main process runs (a forward, say), not
    only in the DataLoader's next(): both become the one-line error."""
    from mrlcache.workers import surviving_workers, worker_deaths

    class Stop(Exception):
        pass

    dead = RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. ")
    with pytest.raises(Stop, match=r"^DataLoader worker \(pid 7\) is killed by signal: Killed \(the system .*resume$"):
        with worker_deaths(Stop, "resume"):
            raise dead  # in the loop's body

    def batches():
        yield 1
        raise dead

    with pytest.raises(Stop, match="pid 7"):
        list(surviving_workers(batches(), Stop, "resume"))
    with pytest.raises(RuntimeError, match="other"), worker_deaths(Stop, "resume"):
        raise RuntimeError("other")
