"""``mrlcache make-corpus``: write the synthetic speaker corpus (see :mod:`mrlcache.demo.synth`)."""

from pathlib import Path

import click

from mrlcache.cli.options import SEED, Number
from mrlcache.config import config_option
from mrlcache.names import CHANNELS, VOICES
from mrlcache.ranges import Range

LENGTH = Number(Range(lo=0.1, unit="seconds"))


def _at_least(n: int) -> Number:
    return Number(Range(lo=n, integer=True))


@click.command("make-corpus")
@config_option
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--speakers", type=_at_least(3), default=40, show_default=True,
              help="Total number of speakers (train + test).")
@click.option("--utterances", type=_at_least(1), default=8, show_default=True,
              help="Utterances per speaker, spread over its videos.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Everything in the corpus is a function of the seed.")
@click.option("--test-speakers", type=_at_least(2), default=None,
              help="Speakers held out for the trial list [default: a quarter, at least 2].")
@click.option("--videos", type=_at_least(2), default=2, show_default=True,
              help="Videos (recording channels) per speaker; target trials cross videos.")
@click.option("--min-seconds", type=LENGTH, default=2.0, show_default=True)
@click.option("--max-seconds", type=LENGTH, default=4.0, show_default=True)
@click.option("--trials-per-speaker", type=_at_least(1), default=None,
              help="Target trials per test speaker (as many non-targets) [default: every "
                   "cross-video pair].")
@click.option("--voices", type=click.Choice(VOICES), default=VOICES[0], show_default=True,
              help="plain: without the fixed speaker resonance and antiresonance that a real "
                   "encoder takes for a channel.")
@click.option("--channel", type=click.Choice(CHANNELS), default=CHANNELS[0], show_default=True,
              help="varied: room, EQ, band limit, noise and vocal effort per video; clean: every "
                   "video recorded alike (with plain voices, real encoders beat random ones).")
@click.option("--overwrite", is_flag=True, help="Replace a corpus previously written to OUT.")
@click.pass_context
def make_corpus(ctx, out, speakers, utterances, seed, test_speakers, videos, min_seconds,
                max_seconds, trials_per_speaker, voices, channel, overwrite):
    """Write a deterministic synthetic corpus to OUT in VoxCeleb layout.

    OUT/{train,test}/idNNNNN/VIDEO/NNNNN.wav (16 kHz 16-bit), OUT/trials.txt (paths
    relative to OUT/test) and OUT/corpus.json.
    """
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from mrlcache.config import write_resolved
    from mrlcache.demo.synth import SynthError
    from mrlcache.demo.synth import make_corpus as build

    start = time.perf_counter()
    console = Console(stderr=True)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("speakers", total=speakers)
        try:
            summary = build(out, speakers=speakers, utterances=utterances, seed=seed,
                            test_speakers=test_speakers, videos=videos,
                            seconds=(min_seconds, max_seconds),
                            trials_per_speaker=trials_per_speaker, voices=voices, channel=channel,
                            overwrite=overwrite,
                            progress=lambda done, total: bar.update(task, completed=done))
        except SynthError as err:
            raise click.ClickException(str(err))
    write_resolved(ctx, out / "make-corpus.yaml")
    click.echo(
        f"wrote {out}: {summary['train_speakers']} train speakers "
        f"({summary['train_utterances']} utterances), {summary['test_speakers']} test speakers "
        f"({summary['test_utterances']} utterances), {summary['trials']} trials "
        f"({summary['target_trials']} target), {summary['audio_seconds']:.0f} s of audio "
        f"in {time.perf_counter() - start:.1f} s"
    )
