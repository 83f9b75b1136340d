"""The allowed values of every option, written once, beside its default: ranges and choices.

A config dataclass (:class:`mrlcache.fit.config.FitConfig`, :class:`mrlcache.extract.ExtractConfig`,
:class:`mrlcache.scorer.ScoreConfig`) declares a numeric field with :func:`bounded`; the
library checks a config with :func:`check_fields` and the command line builds its option
types from the same :class:`Range` (``mrlcache.cli.options``), so ``--lr inf`` is refused
in one line, before any work, naming the option and the range. Every float must be finite:
``inf`` and ``nan`` parse as floats in Python, so a range that only compares (``x > 0``)
lets ``inf`` through and ``nan`` past every test.

A choice field (:func:`choice`) takes one of a tuple of :mod:`mrlcache.names`, and the
command line's ``click.Choice`` is that tuple. This module imports neither torch nor click: ``mrlcache --help`` reads it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

SEED_MAX = 2**32 - 1  # the usual seed range; torch.manual_seed fails beyond 2**64, numpy below 0


class RangeError(ValueError):
    """A number outside its option's range; the message names the option and the range."""


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Range:
    """The values a numeric option allows: finite, and within ``lo``/``hi`` (open or closed).

    ``integer``: whole numbers only (a bool is never a number here); ``unit``: shown after
    the range ("seconds", "radians").
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    unit: str = ""

    def text(self) -> str:
        """The range in words: ``a finite number > 0 and <= 10``."""
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
        if self.hi is not None:
            bounds.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
        kind = "an integer" if self.integer else "a finite number"
        return " ".join([kind, " and ".join(bounds)]).strip() + (f" ({self.unit})" if self.unit else "")

    def ok(self, value) -> bool:
        """True when ``value`` is a number of the right kind, finite and in range."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def parse(self, text) -> int | float:
        """A number from text (or a YAML value); ValueError when it is not one of this kind."""
        if isinstance(text, bool):
            raise ValueError(f"{text!r} is not a number")
        if isinstance(text, (int, float)):
            value = text
        else:
            text = str(text).strip()
            value = int(text) if self.integer else float(text)
        if self.integer and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{text!r} is not an integer")
            value = int(value)
        return value

    def check(self, flag: str, value, error=RangeError):
        """``value`` if it is in range, else raise ``error`` naming ``flag`` and the range."""
        if not self.ok(value):
            raise error(f"{flag} {value}: must be {self.text()}")
        return value


# Ranges shared by several options (the others are written beside their field).
POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
COUNT = Range(lo=1, integer=True)  # views, threads, batch and shard sizes, epochs, dims
NON_NEGATIVE_INT = Range(lo=0, integer=True)
SEED = Range(lo=0, hi=SEED_MAX, integer=True)
SECONDS = Range(lo=0, lo_open=True, unit="seconds")  # a duration: 0 or less never means "no cap"
# A cap on each file must leave the model enough samples (mrlcache.audio.MIN_SAMPLES, 257 at
# 16 kHz; a test keeps the two in step). Not imported here: it would import the audio stack.
CAP_SECONDS = Range(lo=0.02, unit="seconds")
WINDOW_SECONDS = Range(lo=1.0, unit="seconds")  # mrlcache.streams.windows.MIN_WINDOW_SECONDS is its lo
DEFAULT_WINDOW_SECONDS = 300.0  # mrlcache.streams.windows.WINDOW_SECONDS: no VoxCeleb utterance is split
PROBABILITY = Range(lo=0, hi=1, lo_open=True, hi_open=True)  # a prior or a false-accept rate
OPSET = Range(lo=17, hi=23, integer=True)  # ONNX opsets the exporter and onnxruntime both handle


def parse_list(text, range: Range, flag: str, allow_empty: bool = False) -> tuple | None:
    """``"64,128"`` (or a YAML list) -> ``(64, 128)``, each value in ``range``; the one list parser.

    Empty text is refused (``--dims ''`` would otherwise mean "nothing", or "everything")
    unless ``allow_empty``, which makes it None. Raises RangeError naming ``flag``.
    """
    items = list(text) if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    if not any(str(v).strip() for v in items):
        if allow_empty:
            return None
        raise RangeError(f"{flag} {str(text)!r}: give at least one value, e.g. {'64,128' if range.integer else '1,0.5'}")
    values = []
    for v in items:
        try:
            values.append(range.parse(v))
        except ValueError:
            example = "64,128" if range.integer else "1,0.5"
            raise RangeError(f"{flag} {text}: {str(v).strip()!r} is not {range.text()}; give comma-separated "
                             f"values, e.g. {example}") from None
        if not range.ok(values[-1]):
            raise RangeError(f"{flag} {text}: {v} is not {range.text()}")
    return tuple(values)


def bounded(default, range: Range, **metadata):
    """A dataclass field whose value (each value, for a tuple) must lie in ``range``.

    ``many=True`` marks a tuple field whose default is None (its option takes a list).
    """
    return dataclasses.field(default=default, metadata={"range": range, **metadata})


def range_of(cls, name: str) -> Range | None:
    """The declared :class:`Range` of the option ``name`` (its flat key) of a config dataclass, or None."""
    from mrlcache.components import field_of

    try:
        return field_of(cls, name).metadata.get("range")
    except KeyError:
        return None


def flag(name: str) -> str:
    """The command-line spelling of a field: ``weight_decay`` -> ``--weight-decay``."""
    return "--" + name.replace("_", "-")


def check_fields(obj, error=RangeError) -> None:
    """Raise ``error`` for the first field of ``obj`` outside its declared range.

    None means "unset" and is left alone; a tuple is checked value by value; the groups of a
    nested config (:mod:`mrlcache.components`) are checked in turn.
    """
    from mrlcache.components import groups, key_of

    for f in dataclasses.fields(obj):
        rng, value = f.metadata.get("range"), getattr(obj, f.name)
        if f.name in groups(type(obj)):
            check_fields(value, error)
            continue
        if rng is None or value is None:
            continue
        several = isinstance(value, (tuple, list))
        if not all(rng.ok(v) for v in (value if several else (value,))):
            shown = ",".join(map(str, value)) if several else value
            raise error(f"{flag(key_of(f))} {shown}: {'each value ' if several else ''}must be {rng.text()}")


def choice(default, allowed: tuple[str, ...], **metadata):
    """A dataclass field whose value is one of ``allowed`` (a tuple of :mod:`mrlcache.names`) or None."""
    return dataclasses.field(default=default, metadata={"choices": allowed, **metadata})


def check_choices(obj, error) -> None:
    """Raise ``error`` for a choice field whose value is not one of its names (None is unset);
    the groups of a nested config are checked in turn."""
    from mrlcache.components import groups, key_of

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in groups(type(obj)):
            check_choices(value, error)
        elif "choices" in f.metadata and value is not None and value not in f.metadata["choices"]:
            raise error(f"{flag(key_of(f))} {value}: choose one of {', '.join(f.metadata['choices'])}")
