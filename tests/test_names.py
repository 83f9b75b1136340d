"""Every registry is keyed by its tuple of mrlcache.names, in order: the command line's choices
(read from mrlcache.names without importing torch) are then exactly what the library knows."""

import subprocess
import sys

import pytest

from mrlcache import names


def _registries():
    from mrlcache import evaluate, interop, runtime
    from mrlcache.demo import voice
    from mrlcache.cache.backends import BACKENDS
    from mrlcache.export.formats import FORMATS
    from mrlcache.fit import losses
    from mrlcache.models import FUSIONS, HEADS
    from mrlcache.streams import STREAMS
    from mrlcache.streams.ptm import PTMS

    return {"HEADS": HEADS, "FUSIONS": FUSIONS, "STREAMS": STREAMS, "PTMS": PTMS, "BACKENDS": BACKENDS,
            "LOSSES": losses.KINDS, "CLASSIFIERS": losses.CLASSIFIERS, "VECTOR_FORMATS": interop.FORMATS,
            "EXPORT_FORMATS": FORMATS, "SYSTEMS": evaluate.SYSTEMS, "NORMS": evaluate.NORMS,
            "PRECISIONS": runtime.PRECISIONS, "VOICES": voice.VOICES, "CHANNELS": voice.CHANNELS}


@pytest.mark.parametrize("name", list(_registries()))
def test_each_registry_is_keyed_by_its_names(name):
    assert tuple(_registries()[name]) == getattr(names, name)


def test_the_command_line_offers_exactly_the_registries():
    from mrlcache.cli import main

    def choices(command, param):
        return tuple(next(p for p in main.commands[command].params if p.name == param).type.choices)

    assert choices("fit", "head") == names.HEADS
    assert choices("fit", "loss") == names.LOSSES
    assert choices("fit", "fusion") == names.FUSIONS
    assert choices("extract", "backend") == names.BACKENDS
    assert choices("extract", "backbone_name") == names.BACKBONES
    assert choices("extract", "ptm") == names.PTMS
    assert choices("extract", "eval_batch") == names.EVAL_BATCHES
    assert choices("embed", "fmt") == names.VECTOR_FORMATS
    assert choices("export", "fmt") == names.EXPORT_FORMATS
    assert choices("eer", "baselines") == names.SYSTEMS[1:]
    assert choices("make-corpus", "voices") == names.VOICES
    assert choices("make-corpus", "channel") == names.CHANNELS


def test_help_imports_no_torch():
    code = ("import sys; from mrlcache.cli import main; import mrlcache.scorer, mrlcache.extract.config; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
