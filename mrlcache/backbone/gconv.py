"""ReDimNet's small-group 3x3 convolutions as one AVX2 kernel, compiled once per machine.

ReDimNet's 2-D blocks convolve 3x3 over groups of 1-8 channels (b2: groups of 4). oneDNN
runs these through its general convolution at a small fraction of the CPU's rate: in the
inference copy they were 40% of b2's forward for 12% of its multiplications
(benchmarks/README.md). ``gconv.c`` computes them directly on the channels-last layout:
each 8-lane vector holds whole groups, and each input channel is spread over its group's
lanes by one shuffle.

The kernel is compiled with the system C compiler (``$CC``, else ``cc``) the first time it
is needed and kept beside the exported engines (:func:`mrlcache.runtime.engine_cache_dir`,
``kernels/``), named by the SHA-256 of its source, the compiler's version and the flags,
written atomically. Where it cannot be had (no x86-64 CPU with AVX2 and FMA, no compiler,
a failed build), :func:`available` says why, the inference copy keeps oneDNN's convolution,
and one warning names the reason: the outputs agree either way (to about 1e-6), only the
speed differs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from mrlcache.runtime import _warn_once, engine_cache_dir

SOURCE = Path(__file__).with_name("gconv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
GROUPS = (2, 4)  # channels per group gconv.c computes (C a multiple of 8); 1 and 8 ran slower than oneDNN

_STATE: dict = {}  # "lib": the loaded library, or "why": the reason there is none


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _build() -> ctypes.CDLL:
    """Compile (once per source, compiler and flags) and load; raises OSError naming the cause."""
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= _cpu_flags():
        raise OSError("this CPU has no AVX2 + FMA")
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler ({cc!r} not found; set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + version.encode() + " ".join(FLAGS).encode()).hexdigest()[:20]
    target = engine_cache_dir() / "kernels" / f"gconv-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        run = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                             check=False)
        if run.returncode != 0:
            tmp.unlink(missing_ok=True)
            first = (run.stderr.strip().splitlines() or ["no message"])[0]
            raise OSError(f"compiling {SOURCE.name} with {cc} failed: {first}")
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    fn = lib.mrl_gconv3x3
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int] * 3
    return lib


def available() -> str | None:
    """None when the kernel is loaded and ready, else the reason it is not (warned once)."""
    if "lib" not in _STATE and "why" not in _STATE:
        if os.environ.get("MRLCACHE_GCONV") == "0":
            _STATE["why"] = "MRLCACHE_GCONV=0"
        else:
            try:
                _STATE["lib"] = _build()
            except OSError as e:
                _STATE["why"] = str(e)
                _warn_once("gconv", f"the grouped-convolution kernel is not used ({e}); the inference "
                                    "copy runs oneDNN's convolution (same outputs, slower)")
    return _STATE.get("why")


@contextlib.contextmanager
def off():
    """Inference copies made inside this block keep oneDNN's convolutions (for side-by-side
    benchmarks); the kernel is untouched for copies made outside it."""
    _STATE["off"] = True
    try:
        yield
    finally:
        _STATE.pop("off", None)


def supports(conv: torch.nn.Conv2d) -> bool:
    """Whether ``conv`` is a 3x3, stride-1, zero-padded-by-1 convolution the kernel computes
    (and the kernel is not switched :func:`off`)."""
    if _STATE.get("off"):
        return False
    out, per = conv.weight.shape[:2]
    return (tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.padding in ("same", (1, 1))
            and conv.padding_mode == "zeros" and conv.groups > 1 and per in GROUPS
            and out == conv.weight.shape[0] and out % 8 == 0 and out // conv.groups == per)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(O, G, 3, 3) weight (taps as the input is laid out) -> the kernel's [O/8][9][G][8]."""
    o, g = weight.shape[:2]
    w = weight.detach().float().reshape(o // 8, 8, g, 9)  # [c8, lane, k, tap]
    return w.permute(0, 3, 2, 1).contiguous()  # [c8, tap, k, lane]


def conv3x3(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """The grouped 3x3 convolution of (B, C, T, F) channels-last float32 ``x`` on the CPU,
    optionally followed by GELU (the exact erf form, within float32 rounding, 5e-7, of ``torch.nn.GELU()``)."""
    b, c, t, f = x.shape
    g = packed.shape[2]
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    rc = _STATE["lib"].mrl_gconv3x3(x.data_ptr(), packed.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                    b, t, f, c, g, int(gelu), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"gconv kernel: {c} channels in groups of {g} are not supported")
    return y
