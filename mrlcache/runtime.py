"""Rules every command shares, each written once: device, precision, OpenMP, atomic files.

- **Device**: ``"auto"`` is this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is
  present, else the CPU; a CUDA device asked for on a machine without one is an error,
  never a silent CPU run.
- **Precision**: ``"auto"`` is bf16 autocast on GPUs that support it, fp16 on older GPUs,
  float32 on the CPU; fp16 on the CPU is refused.
- **OpenMP**: passive waiting where decoding workers share the cores with the model.
- **Files**: every file a reader may open while it is written (cache metadata, shards'
  neighbours, checkpoints, model files) is written aside and renamed into place, so a
  reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
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
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
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
    return precision


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
    model threads starved them (b2 ran 9x slower on 2 cores under load). Commands without
    workers keep OpenMP's default, which is faster alone (a fit step: 47 -> 39 ms). A value
    the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_aside(path: Path, data: bytes | str) -> Path:
    tmp = _temp_name(path)
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    return tmp


def atomic_write(path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` aside (``.NAME.tmp-PID``), fsync, then rename into place."""
    path = Path(path)
    tmp = _write_aside(path, data)
    try:
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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
