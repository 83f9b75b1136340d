"""What runs the backbone's pooled forward in ``extract`` and ``embed``: the engine named, or
the one ``--engine auto`` picks.

The engines are :data:`mrlcache.names.ENGINES`:

- ``torch``: the backbone as loaded, the reference (bit-identical to every earlier cache;
  the default, so the demo and existing caches do not change);
- ``fused``: ReDimNet's frozen inference copy (:meth:`ReDimNet.for_inference`: BatchNorm
  folded, channels-last), vectors within 1e-5 of torch's;
- ``onnxruntime``: the backbone exported once to ONNX and run by onnxruntime on the CPU
  (:class:`mrlcache.export.engine.OnnxBackbone`), vectors within 1e-5 of torch's;
- ``auto``: on the CPU, for a pooled-only float32 job, the first of :data:`CPU_PREFERENCE`
  that can run the backbone; the torch engine everywhere else (CUDA, other streams,
  autocast), since only it computes those.

The engine used is recorded: in ``cache.json`` (``engine``, absent for torch, as before
engines existed) and in its summary (``summary.engine``, always).
"""

from __future__ import annotations

from mrlcache import names

# auto on the CPU, most preferred first. Measured side by side on this project's CPU
# (benchmarks/README.md, "Extraction against the bare forward"): fused and onnxruntime
# extract at the same speed within the noise of a shared machine, both ~1.2x torch, and
# fused needs no export (40-50 s the first time, minutes on loaded cores) and no extra
# package, so it comes first; onnxruntime serves encoders fused is not written for.
CPU_PREFERENCE = ("fused", "onnxruntime", "torch")  # every engine of names.ENGINES but auto (tests/test_engines.py)


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def can_run(engine: str, backbone) -> bool:
    """Whether ``engine`` can run ``backbone``'s pooled forward on the CPU."""
    if engine == "fused":
        return hasattr(backbone, "for_inference")
    if engine == "onnxruntime":
        return _onnxruntime_available()
    return engine == "torch"


def choose(engine: str, backbone, *, device_type: str, pooled_float32: bool) -> tuple[str, str]:
    """The engine to run, and why (a few words for the log line).

    Args:
        engine: one of :data:`names.ENGINES`; any but ``auto`` is returned as given.
        backbone: the torch backbone (None: no backbone runs, torch is kept).
        device_type: "cpu" or "cuda".
        pooled_float32: the job computes only the pooled stream, in float32 (what the
            engines other than torch compute).
    """
    if engine != "auto":
        return engine, "asked for"
    if backbone is None or device_type != "cpu" or not pooled_float32:
        why = "no backbone" if backbone is None else (f"on {device_type}" if device_type != "cpu"
                                                      else "streams or precision only torch computes")
        return "torch", why
    for candidate in CPU_PREFERENCE:
        if can_run(candidate, backbone):
            return candidate, "fastest measured on the CPU that runs this backbone"
    return "torch", "no other engine runs this backbone"  # unreachable: torch runs everything


def engine_backbone(engine: str, backbone, *, threads: int | None = None, spin: bool = True, log=None):
    """An object with ``pooled(wave)`` computing ``backbone``'s pooled vectors with ``engine``.

    ``fused`` is a folded copy (the backbone itself is untouched); ``onnxruntime`` is
    exported or read from the engine cache and checked against ``backbone`` (raises
    :class:`mrlcache.export.ExportError`); ``torch`` is ``backbone``.
    """
    if engine == "fused":
        return backbone.for_inference()
    if engine == "onnxruntime":
        from mrlcache.export.engine import OnnxBackbone

        return OnnxBackbone(backbone, threads=threads, spin=spin, log=log)
    if engine != "torch":
        raise ValueError(f"engine {engine!r} is not one of {names.ENGINES} (auto is resolved by choose())")
    return backbone
