"""What runs the backbone's pooled forward in ``extract`` and ``embed``: the engine named, or
the one ``--engine auto`` picks.

The engines are :data:`mrlcache.names.ENGINES`:

- ``torch``: the backbone as loaded, the reference (bit-identical to every earlier cache;
  the default, so the demo and existing caches do not change);
- ``fused``: ReDimNet's frozen inference copy (:meth:`ReDimNet.for_inference`: BatchNorm
  folded, channels-last, small-group convolutions in a kernel of mrlcache's own), vectors
  within 1e-5 of torch's;
- ``onnxruntime``: the backbone exported once to ONNX and run by onnxruntime on the CPU
  (:class:`mrlcache.export.engine.OnnxBackbone`), vectors within 1e-5 of torch's;
- ``auto``: on the CPU, for a pooled-only float32 job, the engine measured fastest for the
  encoder (:data:`CPU_CHOICE`: fused for ReDimNet); torch everywhere else (CUDA, other
  streams, autocast, encoders not measured), since only it computes all of those.

The engine used is recorded: in ``cache.json`` (``engine``, absent for torch, as before
engines existed) and in its summary (``summary.engine``, always).
"""

from __future__ import annotations

from mrlcache import names

# auto's engine on the CPU for a pooled-only float32 job, per encoder, as measured side by side
# on this project's CPU (benchmarks/README.md, "Extraction against the bare forward, every
# engine", "Session 9" and "Session 10"): for ReDimNet b2 the fused copy's forward reached 0.39
# of the matmul rate against onnxruntime's 0.36 and torch's 0.23 (CPU time, session 7), and with
# its small-group convolution kernel 0.43-0.65 against onnxruntime's 0.31-0.39 (sessions 9-10);
# it needs no export (40-50 s the first time, minutes on loaded cores) nor an extra package. Encoders not listed were not measured
# and keep the reference engine.
CPU_CHOICE = {"redimnet": "fused"}


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
    encoder = getattr(backbone, "encoder", "redimnet")
    chosen = CPU_CHOICE.get(encoder, "torch")
    if chosen != "torch" and can_run(chosen, backbone):
        return chosen, f"the fastest measured for {encoder} on the CPU"
    return "torch", f"no faster engine measured for {encoder}"


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
