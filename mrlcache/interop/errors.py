"""The error of vectors in and out (its own module, so the readers and the Kaldi parser share it without a cycle)."""


class InteropError(ValueError):
    """Vectors or side files that cannot be imported or exported; the message names the fix."""
