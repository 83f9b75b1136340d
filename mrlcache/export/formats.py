"""The export formats by name (no torch here: the command line reads the names for ``--format``).

Each is a module with ``write``, ``claims`` and ``runner`` (see :mod:`mrlcache.export`).
"""

FORMATS = {"onnx": "mrlcache.export.onnx", "torchscript": "mrlcache.export.torchscript"}
TOLERANCE = 1e-4  # largest relative error verify_export accepts


class ExportError(Exception):
    """A model, option or file that cannot be exported or verified."""
