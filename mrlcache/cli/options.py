"""What the commands share about option values: ranges, the device check, one-line OS errors.

Every bad value is refused before any work starts, naming the option and the valid range
(click prints ``Invalid value for '--max-seconds': -1.0 is not in the range x>0``).
"""

from __future__ import annotations

import errno

import click

SECONDS = click.FloatRange(min=0, min_open=True)  # a duration: 0 or less never means "no cap"
# --max-seconds: a cap must leave the model enough samples (mrlcache.audio.MIN_SAMPLES, 257
# at 16 kHz; a test keeps the two in step). Not imported here: it keeps --help fast.
CAP = click.FloatRange(min=0.02)
COUNT = click.IntRange(min=1)  # views, threads, batch and shard sizes, dims
WORKERS = click.IntRange(min=0)  # 0: decode in the main process
SEED = click.IntRange(min=0)  # numpy's generators refuse negative seeds


class _Window(click.ParamType):
    """``--window-seconds``: seconds (at least 1, MIN_WINDOW_SECONDS of mrlcache.streams.windows,
    which ExtractConfig checks too) or ``none`` (one pass per utterance)."""

    name = "seconds|none"

    def convert(self, value, param, ctx):
        if value is None or str(value).strip().lower() == "none":
            return None  # YAML null or the word
        try:
            if isinstance(value, bool):
                raise ValueError
            seconds = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number of seconds or 'none'", param, ctx)
        if not seconds >= 1.0:
            self.fail(f"{value} is below 1 second; give at least 1, or 'none' for one pass per utterance", param, ctx)
        return seconds


WINDOW = _Window()
WINDOW_DEFAULT = 300.0  # mrlcache.streams.windows.WINDOW_SECONDS (not imported: torch); a test keeps them equal
WINDOW_HELP = ("Whole utterances longer than this are embedded window by window and the pooled statistics "
               "combined, so memory stays that of one window; 'none': one pass each (memory grows with length).")


def window_option(command):
    """``--window-seconds`` with the project default (mrlcache.streams.windows.WINDOW_SECONDS)."""
    return click.option("--window-seconds", type=WINDOW, default=WINDOW_DEFAULT, show_default=True,
                        help=WINDOW_HELP)(command)


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
