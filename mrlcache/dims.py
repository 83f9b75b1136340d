"""Which Matryoshka dims a command works at: the one parser and the one check against a model.

``--dims 64,128`` is parsed by :func:`parse_dims` (each a positive integer; empty text is
refused, it never means "every dim"); :func:`select_dims` keeps the request to the dims the
model was trained for, :func:`select_dim` one ``--dim``. Imports neither torch nor click.
"""

from __future__ import annotations

from mrlcache.ranges import COUNT, RangeError, parse_list


def parse_dims(text, flag: str = "--dims") -> tuple[int, ...]:
    """``"64,128"`` or ``[64, 128]`` -> ``(64, 128)``; RangeError on empty text or a bad value."""
    return parse_list(text, COUNT, flag)


def select_dim(dim, trained, flag: str = "--dim") -> int:
    """One embedding size the model was trained for; None -> its largest. RangeError otherwise."""
    trained = [int(d) for d in trained]
    if dim is None:
        return trained[-1]
    if isinstance(dim, bool) or int(dim) != dim or int(dim) not in trained:
        raise RangeError(f"{flag} {dim}: the model was trained for dims {trained}")
    return int(dim)


def select_dims(requested, trained, flag: str = "--dims") -> list[int]:
    """The requested dims, sorted and unique, each one the model was trained for; None -> every dim.

    Raises RangeError naming ``flag`` and the model's dims.
    """
    trained = [int(d) for d in trained]
    if requested is None:
        return trained
    if isinstance(requested, (str, int)):
        requested = parse_dims(requested if isinstance(requested, str) else str(requested), flag)
    dims = sorted({int(d) for d in requested})
    unknown = [d for d in dims if d not in trained]
    if unknown or not dims:
        shown = ",".join(map(str, requested))
        raise RangeError(f"{flag} {shown}: the model was trained for dims {trained} only")
    return dims
