"""Rules every command shares, each written once: device, precision, OpenMP, atomic files.

- **Device**: ``"auto"`` is this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is
  present, else the CPU; a CUDA device asked for on a machine without one is an error,
  never a silent CPU run.
- **Precision**: ``"auto"`` is bf16 autocast on GPUs that support it, fp16 on older GPUs,
  float32 on the CPU; fp16 on the CPU is refused.
- **OpenMP**: passive waiting where decoding workers share the cores with the model.
- **Allocator**: glibc keeps freed activation buffers for reuse instead of returning them
  to the kernel after every operation (commands that run the backbone).
- **Files**: a file a reader may open while it is written is written aside (created
  exclusively, unpredictable name: a planted link never redirects it) and renamed into
  place. Inputs are opened by :func:`open_regular`: a FIFO, device or folder is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tempfile
from pathlib import Path

# torch is imported inside the functions: passive_openmp must run before torch loads
# (libgomp reads OMP_WAIT_POLICY once, when torch starts its thread pool), and writing a
# JSON file atomically should not load torch at all.

from mrlcache.names import PRECISIONS  # noqa: E402 (auto, fp32, bf16, fp16)


class DeviceError(ValueError):
    """A device or precision this machine cannot provide; the message names the fix."""


def resolve_device(name: str, local_rank: int | None = None):
    """``"auto"`` -> this rank's GPU when CUDA is present, else the CPU; checks explicit names.

    Args:
        name: "auto", "cpu", "cuda" or "cuda:N".
        local_rank: which GPU "auto" takes (default: ``LOCAL_RANK`` from torchrun, else 0).
    Returns:
        torch.device
    """
    import torch

    if local_rank is None:
        local_rank = env_int("LOCAL_RANK", 0)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name}: not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_precision(precision: str, device) -> str:
    """``"auto"`` -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    import torch

    if precision not in PRECISIONS:
        raise DeviceError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("--precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_once("bf16-cpu", "--precision bf16 on a CPU without native bfloat16 (no avx512_bf16 or AMX): "
                   "emulated, measured 7.5x slower than fp32 for a ReDimNet b2 forward (benchmarks/README.md); "
                   "use --precision fp32 on this machine")
    return precision


_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    """One line on stderr the first time ``key`` is warned about in this process."""
    import sys

    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {message}", file=sys.stderr)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (avx512_bf16 or AMX tiles), as oneDNN needs."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def autocast(device, precision: str):
    """Autocast context for a resolved precision (the mel front end opts out and stays float32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def passive_openmp() -> None:
    """Let OpenMP threads sleep between parallel regions; call before torch starts its threads.

    For commands whose decoding workers share the cores with the model: busy-waiting
    model threads starved them (b2 ran 9x slower on 2 cores under load), and for every fit
    (a cache fit ran 6.5x slower with busy waiting on a busy machine, benchmarks/README.md).
    Other commands keep OpenMP's default, which is faster alone (a fit step: 47 -> 39 ms on
    a quiet machine). A value the user set is kept. A short spin before sleeping
    (``GOMP_SPINCOUNT=10000``, about 0.1 ms, which libgomp takes over the policy) took fused b2
    extraction 14-21% less time on 2 quiet cores and 21-27% more beside one busy process
    (benchmarks/README.md, session 10): it is the user's to set, not a default.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def engine_cache_dir() -> Path:
    """Where exported engines and compiled kernels are kept: ``$MRLCACHE_ENGINE_CACHE``, else
    ``$XDG_CACHE_HOME/mrlcache/engines`` (``~/.cache/mrlcache/engines``)."""
    if os.environ.get("MRLCACHE_ENGINE_CACHE"):
        return Path(os.environ["MRLCACHE_ENGINE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mrlcache" / "engines"


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """An integer from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), checked.

    Raises:
        DeviceError: a value that is not an integer >= ``minimum``, named with the fix.
    """
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise DeviceError(f"{name}={text!r} in the environment is not an integer >= {minimum}; unset it, or "
                          f"launch with torchrun, which sets it")
    return value


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) that torchrun set, checked; (0, 1, 0) without it.

    Raises:
        DeviceError: malformed values, or a rank outside [0, world_size).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, env_int("LOCAL_RANK", 0)
    rank, world = env_int("RANK", 0), env_int("WORLD_SIZE", 1, minimum=1)
    if rank >= world:
        raise DeviceError(f"RANK={rank} is not below WORLD_SIZE={world} in the environment; unset both, or "
                          f"launch with torchrun")
    return rank, world, env_int("LOCAL_RANK", rank)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def reuse_large_allocations(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Make glibc keep freed multi-megabyte buffers in the heap for the next operation.

    By default glibc maps large allocations afresh and unmaps them on ``free``, so every
    backbone layer page-faults its output anew (higher thresholds: b0 batches 1.36-1.77x faster in
    issue 23, b2 about 8% less CPU in benchmarks/README.md); the heap keeps its peak size. Values set
    through ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` are kept. Returns whether
    glibc accepted both (False elsewhere, e.g. musl or macOS: only speed depends on it).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = True
    for env, param, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, mmap_threshold),
                              ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, trim_threshold)):
        if env not in os.environ:
            # glibc caps the mmap threshold (32 MiB on 64-bit builds before 2.26): try lower values.
            while value >= 1 << 25 and not mallopt(param, ctypes.c_int(min(value, (1 << 31) - 1))):
                value >>= 1
            ok = ok and value >= 1 << 25
    return ok


# ----------------------------------------------------------------------------- files


def fsync_dir(path) -> None:
    """fsync a directory, so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path) -> None:
    """fsync every file under ``path`` (or ``path`` itself), so a rename publishes data."""
    path = Path(path)
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TEMP_MARK = ".tmp-"  # temporary files are ".NAME.tmp-XXXXXXXX" (mkstemp's random part)


def temp_file(path: Path, mode: int = 0o644) -> tuple[int, Path]:
    """Create a new empty file beside ``path`` exclusively; returns (open fd, its path).

    ``mkstemp`` uses O_CREAT|O_EXCL with a random name: it never opens an existing file or
    follows a link planted under the name, unlike the predictable names used before.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}")
    os.fchmod(fd, mode)
    return fd, Path(name)


def temp_dir(path: Path) -> Path:
    """A new empty folder beside ``path`` (exclusive, random name), to build ``path`` in."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published folder is readable like any other
    return tmp


def write_aside(path, data: bytes | str) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (fsynced); returns its path."""
    return _write_aside(Path(path), data)


def _write_aside(path: Path, data: bytes | str) -> Path:
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` aside (``.NAME.tmp-XXXXXXXX``), fsync, then rename into place."""
    path = Path(path)
    tmp = _write_aside(path, data)
    try:
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def publish_files(index: tuple[Path, Path], sides=()) -> None:
    """Rename finished temporary files into place so a reader never pairs new and old files.

    ``index`` is (temporary, final) of the file readers open (``X.npy``, ``X.scp``), ``sides``
    those it refers to (``X.ids.txt``, ``X.ark``). The old index goes first and the new one
    comes last, so an interrupt at any point leaves either no index or a complete new set,
    never new vectors beside old ids.
    """
    tmp, final = index
    if final.is_symlink() or final.exists():
        final.unlink()
        fsync_dir(final.parent)
    for side_tmp, side_final in sides:
        os.replace(side_tmp, side_final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an old ``out`` is removed only after that."""
    import shutil

    fsync_tree(tmp)
    old = None
    if out.is_symlink() or out.exists():
        old = temp_dir(out)
        os.replace(out, old / "old")
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)


def write_exclusive(path, data: bytes | str) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; False if it did.

    Written aside then hard-linked, so a concurrent reader never sees a half-written file
    and of two processes racing to create it, exactly one wins.
    """
    path = Path(path)
    tmp = _write_aside(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def torch_bytes(obj) -> bytes:
    """``torch.save(obj)`` into memory: the bytes depend on ``obj`` only, not on a file name."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_torch_save(obj, path) -> str:
    """``torch.save`` atomically (see :func:`atomic_write`); returns the file's SHA-256."""
    data = torch_bytes(obj)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class PathRefused(OSError):
    """A path a command refuses to read or write; the message is the whole one-line error."""


class NotRegularFileError(PathRefused):
    """An input that is not a regular file (a FIFO, a device, a folder); reading it could hang."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, what: str = ""):
    """Open an input file for binary reading, refusing anything but a regular file.

    Opened non-blocking first, so a FIFO is refused at once instead of waiting for a
    writer; ``what`` names the option in the message ("--trials").

    Raises:
        NotRegularFileError: a FIFO, device, socket or folder (an OSError, so commands
            print it as one line).
        OSError: missing or unreadable.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            label = f"{what} {path}" if what else str(path)
            raise NotRegularFileError(f"{label}: is {_kind(mode)}, not a regular file; give a file "
                                      f"(copy the data to one first)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path, what: str = "") -> None:
    """Refuse ``path`` unless it is a regular file (see :func:`open_regular`); opens nothing that blocks."""
    with open_regular(path, what):
        pass


def read_text(path, encoding: str = "utf-8", what: str = "") -> str:
    """A regular file's text (:func:`open_regular`): a FIFO given as an input is refused, not waited on."""
    with open_regular(path, what) as f:
        return f.read().decode(encoding)
