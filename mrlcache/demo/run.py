"""The whole pipeline on a built-in synthetic corpus: corpus -> extract -> fit -> eer.

The demo runs the real commands, in-process, and prints each one first, so what a user
sees is exactly what they would type on VoxCeleb. Published weights cannot be downloaded
everywhere, so by default the backbone is a randomly initialised ReDimNet b0: a random
feature extractor whose raw pooled vectors score poorly, while a head trained on them
must do far better. With ``weights`` or ``variant`` the real backbone is used.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARKER = "demo.json"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the full one (under five minutes on 2 cores) or --quick (CI)."""

    speakers: int
    utterances: int
    views: int
    crop_seconds: float
    epochs: int
    batch_size: int = 64  # a few hundred training utterances: small batches give enough steps


# A quarter of the speakers are test speakers. Fewer than ~40 speakers leave too few
# trials to tell the head from the raw vectors; 60 keep the full demo near two minutes.
FULL = DemoSize(speakers=60, utterances=8, views=3, crop_seconds=2.0, epochs=30)
QUICK = DemoSize(speakers=40, utterances=6, views=2, crop_seconds=1.5, epochs=20)


def demo_commands(out: Path, size: DemoSize, *, seed: int = 0, variant: str = "b0", weights: str | None = None,
                  random_init: bool = True, backbone_name: str | None = None) -> list[list[str]]:
    """The commands the demo runs, as argument lists (without the leading 'mrlcache').

    With real weights (``weights`` or a published ``variant``), eer also scores the
    encoder's own published embedding next to the head.
    """
    corpus, train, test, run = out / "corpus", out / "cache-train", out / "cache-test", out / "run"
    named = ["--backbone", backbone_name] if backbone_name else []
    if weights:
        backbone = [*named, "--weights", str(weights)]
    elif random_init:
        backbone = [*named, "--random-init", "--variant", variant]
    else:
        backbone = [*named, "--variant", variant]
    # The test cache must use exactly the training cache's weights: for a random backbone
    # that is the file extract saved beside the training cache.
    test_backbone = ["--weights", str(train / "backbone.pt")] if random_init and not weights else backbone
    return [
        ["make-corpus", str(corpus), "--speakers", str(size.speakers), "--utterances", str(size.utterances),
         "--seed", str(seed)],
        ["extract", "--data", str(corpus / "train"), "--out", str(train), *backbone, "--views", str(size.views),
         "--crop-seconds", str(size.crop_seconds), "--seed", str(seed)],
        ["extract", "--data", str(corpus / "test"), "--out", str(test), *test_backbone, "--mode", "eval",
         "--seed", str(seed)],
        ["fit", "--cache", str(train), "--dims", "64,128,192,256", "--out", str(run), "--epochs", str(size.epochs),
         "--batch-size", str(size.batch_size), "--seed", str(seed)],
        ["eer", "--model", str(run / "model.pt"), "--trials", str(corpus / "trials.txt"), "--cache", str(test),
         "--baseline", "raw", *([] if random_init and not weights else ["--baseline", "published"]),
         "--json", str(out / "results.json")],
    ]


def _inventory(out: Path) -> dict[str, int]:
    """{relative path: size} of every file and link under ``out`` (links are not followed)."""
    found = {}
    for root, dirs, files in os.walk(out):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root, name)
            found[path.relative_to(out).as_posix()] = path.lstat().st_size
    return found


def _record(out: Path, record: dict) -> None:
    from mrlcache.runtime import atomic_write

    atomic_write(out / MARKER, json.dumps(record, indent=2) + "\n")


def prepare_out(out: Path) -> None:
    """Make ``out`` ready: new, empty, or a previous demo (cleared). Anything else is refused.

    A previous demo is deleted only when the demo can prove it wrote all of it: its
    ``demo.json`` lists every file the demo left (path and size), and nothing else is there.
    """
    import shutil

    if out.exists() and any(out.iterdir()):
        try:
            written = json.loads((out / MARKER).read_text())["files"]
            assert isinstance(written, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise ValueError(f"{out}: not empty and not a previous demo (no list of the files the demo wrote); "
                             f"choose another --out") from None
        foreign = [f for f, size in _inventory(out).items() if f != MARKER and written.get(f) != size]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ValueError(f"{out}: a previous demo, but these files are not the ones it wrote: {shown}; "
                             f"move them away or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_demo(out, run: Callable[[list[str]], None], size: DemoSize = FULL, *, seed: int = 0, variant: str = "b0",
             weights: str | None = None, random_init: bool = True, backbone_name: str | None = None,
             echo=print) -> dict:
    """Run every demo command; returns the eer results (the JSON the last command wrote).

    Args:
        out: the demo's folder (a previous demo there is replaced).
        run: runs one command given its arguments without the leading "mrlcache"; the
            command line passes its own group in, so this package never imports the CLI.
    """
    out = Path(out).resolve()
    prepare_out(out)
    commands = demo_commands(out, size, seed=seed, variant=variant, weights=weights, random_init=random_init,
                             backbone_name=backbone_name)
    record = {"size": size.__dict__, "seed": seed, "random_init": random_init,
              "commands": [["mrlcache", *c] for c in commands], "files": {}}
    _record(out, record)
    if random_init and not weights:
        echo("NOTE: the backbone is a randomly initialised ReDimNet b0 (no published weights are downloaded). "
             "Its raw pooled vectors are a random feature extractor; the fitted head must do far better. "
             "Use --weights PATH or --variant NAME for a real backbone (README: published weights).")
    try:
        for args in commands:
            echo("$ mrlcache " + shlex.join(args))
            run(args)
    finally:  # also when a step fails or is interrupted: a rerun may then clear what was written
        record["files"] = {f: n for f, n in _inventory(out).items() if f != MARKER}
        _record(out, record)
    return json.loads((out / "results.json").read_text())
