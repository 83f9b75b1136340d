"""What the commands share about option values: typed ranges, options made from config
dataclasses, the device check, one-line OS errors.

Every bad value is refused before any work starts, naming the option and the valid range
(``Invalid value for '--lr': inf is not a finite number > 0 and <= 10``): the ranges are
those of :mod:`mrlcache.ranges`, declared beside each field's default in its config
dataclass, and the library checks the same ranges for Python callers.
"""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import click

from mrlcache import components, ranges
from mrlcache.config import CommaList



class Number(click.ParamType):
    """A number in a :class:`mrlcache.ranges.Range`: finite, in range, else one line naming both.

    ``none_word``: the word (and YAML null) that means "unset", e.g. ``none`` for ``--window-seconds``.
    """

    def __init__(self, range: ranges.Range, none_word: str | None = None):
        self.range, self.none_word = range, none_word
        self.name = ("integer" if range.integer else "float") + (f"|{none_word}" if none_word else "")

    def convert(self, value, param, ctx):
        if self.none_word and (value is None or str(value).strip().lower() == self.none_word):
            return None
        try:
            number = self.range.parse(value)
        except ValueError:
            self.fail(f"{value!r} is not {self.range.text()}"
                      + (f", nor '{self.none_word}'" if self.none_word else ""), param, ctx)
        if not self.range.ok(number):
            self.fail(f"{value} is not {self.range.text()}"
                      + (f", nor '{self.none_word}'" if self.none_word else ""), param, ctx)
        return number


class NumberList(CommaList):
    """``64,128,192`` (or a YAML list) -> a tuple of numbers, each in ``range`` (:func:`mrlcache.ranges.parse_list`).

    Empty text is refused unless ``allow_empty`` (then it is None, the option's "unset").
    """

    def __init__(self, range: ranges.Range, allow_empty: bool = False):
        self.range, self.allow_empty = range, allow_empty
        self.name = "integers" if range.integer else "numbers"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, tuple) and all(self.range.ok(v) for v in value):
            return value
        try:
            return ranges.parse_list(value, self.range, "", allow_empty=self.allow_empty)
        except ranges.RangeError as err:
            self.fail(str(err).strip(), param, ctx)


SECONDS = Number(ranges.SECONDS)
CAP = Number(ranges.CAP_SECONDS)  # --max-seconds
COUNT = Number(ranges.COUNT)  # views, threads, batch and shard sizes, dims
WORKERS = Number(ranges.NON_NEGATIVE_INT)  # 0: decode in the main process
SEED = Number(ranges.SEED)
PROBABILITY = Number(ranges.PROBABILITY)  # --prior, --far
DIMS = NumberList(ranges.COUNT)  # --dims of the commands that score or export a model
WINDOW = Number(ranges.WINDOW_SECONDS, none_word="none")
WINDOW_DEFAULT = ranges.DEFAULT_WINDOW_SECONDS  # mrlcache.streams.windows.WINDOW_SECONDS
WINDOW_HELP = ("Whole utterances longer than this are embedded window by window and the pooled statistics "
               "combined, so memory stays that of one window; 'none': one pass each (memory grows with length).")


def window_option(command):
    """``--window-seconds`` with the project default (mrlcache.streams.windows.WINDOW_SECONDS)."""
    return click.option("--window-seconds", type=WINDOW, default=WINDOW_DEFAULT, show_default=True,
                        help=WINDOW_HELP)(command)


def field_option(cls, name: str, help: str | None = None, flag: str | None = None, inverted: str | None = None,
                 param: str | None = None, **kw):
    """A click option for field ``name`` of config dataclass ``cls``: default, choices and range from there.

    ``inverted``: the field a flag switches off (``--quiet`` sets ``progress`` to False).
    ``name``: the field's flat key (:mod:`mrlcache.components`), also for a field of a group.
    ``param``: the parameter (and config-file key) name when it is not the field's.
    Anything in ``kw`` (a ``type``, ``show_default``) overrides what the field gives.
    """
    field = components.field_of(cls, inverted or name)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    rng, allowed = field.metadata.get("range"), field.metadata.get("choices")
    if inverted:
        kw.update(is_flag=True, default=not default)
    elif isinstance(default, bool):
        kw.update(is_flag=True, default=default)
    else:
        if allowed:
            kw.setdefault("type", click.Choice(allowed))
        elif rng is not None and (isinstance(default, tuple) or field.metadata.get("many")):
            kw.setdefault("type", NumberList(rng, allow_empty=default is None))
        elif rng is not None:
            kw.setdefault("type", Number(rng))
        elif isinstance(default, tuple):
            kw.setdefault("type", CommaList())
        elif default is not None:
            kw.setdefault("type", type(default))
        kw["default"] = ",".join(map(str, default)) if isinstance(default, tuple) else default
        kw.setdefault("show_default", default is not None)
    flags = flag if isinstance(flag, (list, tuple)) else [flag or ranges.flag(name)]
    return click.option(*flags, param or name, help=help, cls=FieldOption, config_class=cls,
                        key=None if inverted else name, **kw)


def config_options(cls, help: dict, inverted: dict | None = None, kw: dict | None = None,
                   prefix: str = "", skip: tuple = ()) -> list:
    """One option per field of config dataclass ``cls``, its groups walked in order
    (:func:`mrlcache.components.leaves`): a new field is a new option with no edit here.

    ``help``: {flat key: help text}; ``inverted``: {flag's parameter name: field} for a flag
    that switches a field off (``quiet`` -> ``progress``); ``kw``: {flat key: more
    :func:`field_option` arguments} (a ``type``); ``prefix``: put before every help text;
    ``skip``: fields the command sets otherwise.
    """
    inverted, kw = inverted or {}, kw or {}
    by_field = {field: flag for flag, field in inverted.items()}
    options = []
    for key in components.leaves(cls):
        if key in skip:
            continue
        name = by_field.get(key, key)
        text = help.get(name)
        options.append(field_option(cls, name, prefix + text if text else None, inverted=inverted.get(name),
                                    **kw.get(name, {})))
    return options


class FieldOption(click.Option):
    """An option made from a config dataclass field: ``config_class`` lets ``--config`` read the
    file's nested form (:func:`mrlcache.config.read_yaml_options`)."""

    def __init__(self, *args, config_class=None, key=None, **kw):
        super().__init__(*args, **kw)
        self.config_class, self.key = config_class, key  # key: the field's flat key (None: an inverted flag)

    @property
    def group(self) -> str | None:
        """The group of ``config_class`` holding the field (``optim`` for ``--lr``), or None."""
        if self.key is None:
            return None
        return components.leaves(self.config_class)[self.key][0]


# The scorer's options, shared by eer and calibrate: parameter name -> ScoreConfig field.
SCORE_PARAMS = {"center_cache": "center", "asnorm_cohort": "asnorm_cohort", "asnorm_topk": "asnorm_topk",
                "snorm_cohort": "snorm_cohort"}


def score_options(command):
    """``--center``, ``--asnorm-cohort``, ``--asnorm-topk`` (also ``--topk``), ``--snorm-cohort``
    from :class:`mrlcache.scorer.ScoreConfig`; :func:`score_config` collects them."""
    from mrlcache.scorer import ScoreConfig

    cache = click.Path(exists=True, file_okay=False)
    for option in reversed([
        field_option(ScoreConfig, "center", "Training cache whose mean embedding is subtracted before scoring.",
                     param="center_cache", type=cache),
        field_option(ScoreConfig, "asnorm_cohort", "Training cache whose per-speaker means form the AS-Norm "
                     "cohort (with a calibration: its score means are quality measures).", type=cache),
        field_option(ScoreConfig, "asnorm_topk", "AS-Norm top-k cohort scores.", flag=("--asnorm-topk", "--topk")),
        field_option(ScoreConfig, "snorm_cohort", "Training cache whose per-speaker means form the S-Norm cohort "
                     "(all of it; not with --asnorm-cohort).", type=cache),
    ]):
        command = option(command)
    return command


def score_config(params: dict):
    """The :class:`mrlcache.scorer.ScoreConfig` of a command's parameters (removed from ``params``)."""
    from mrlcache.scorer import ScoreConfig
    from mrlcache.trial_vectors import EvaluateError

    try:
        return ScoreConfig(**{field: params.pop(name) for name, field in SCORE_PARAMS.items()})
    except EvaluateError as err:
        raise click.ClickException(str(err)) from None


def check_plot(path) -> None:
    """Refuse a ``--plot`` file matplotlib cannot write (no matplotlib, or an unknown image type)."""
    if path is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise click.ClickException("--plot needs matplotlib, a dependency of mrlcache that is missing here: "
                                   "pip install 'matplotlib>=3.9'")
    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in kinds:
        raise click.BadParameter(f"{path}: {'no' if not suffix else 'unknown'} image type "
                                 f"{'.' + suffix if suffix else ''}; end the name with one of "
                                 f"{', '.join('.' + k for k in sorted(kinds))}", param_hint="'--plot'")


def check_device(name: str) -> str:
    """Refuse ``--device`` values this machine cannot provide (mrlcache.runtime's rule).

    Called in the command body, after :func:`mrlcache.runtime.passive_openmp` where the
    command needs it, since resolving a device imports torch.
    """
    from mrlcache.runtime import DeviceError, resolve_device

    try:
        resolve_device(name)
    except DeviceError as err:
        raise click.BadParameter(f"{name!r}: " + str(err).removeprefix(f"--device {name}: "), param_hint="'--device'") from None
    return name


def describe_os_error(err: OSError) -> str:
    """One line for an operating-system failure: the path, what went wrong, what to do."""
    from mrlcache.runtime import PathRefused

    if isinstance(err, PathRefused):  # a refusal of ours: its message names the path and the fix
        return str(err)
    path = err.filename if err.filename is not None else None
    if err.filename2 is not None:
        path = f"{err.filename} -> {err.filename2}"
    what = err.strerror or str(err)
    hint = {
        errno.ENOSPC: "free some space (or choose another --out) and rerun the same command",
        errno.EROFS: "the file system is read-only: choose another --out",
        errno.EACCES: "no permission: fix the permissions or choose another path",
        errno.ELOOP: "a symbolic link points back to a folder above it: remove the link",
    }.get(err.errno, "fix it and rerun the same command")
    return f"{path}: {what}; {hint}" if path else f"{what}; {hint}"


def _set_verify(ctx, param, value):
    if value:
        from mrlcache.cache import verify_by_default

        verify_by_default(True)
        ctx.call_on_close(lambda: verify_by_default(False))  # this command only
    return value


def verify_option(command):
    """``--verify``: check the checksums of every cache the command reads before using it."""
    return click.option("--verify", is_flag=True, expose_value=False, callback=_set_verify,
                        help="Recompute the checksums of every cache read (one extra read of each); a "
                             "damaged cache is refused naming the shard.")(command)
