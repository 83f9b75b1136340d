"""Every command-line default is the library's default: the CLI restates nothing.

The option defaults of extract, eer, embed and demo are compared with the dataclass fields
and function arguments they are passed to; an option the map below does not know fails
the test, so a new option cannot drift unnoticed.
"""

import dataclasses
import inspect

from mrlcache.augment import AugmentConfig
from mrlcache.cli import main
from mrlcache.demo import run as demo_run
from mrlcache.evaluate import evaluate, pooled_from_audio
from mrlcache.components import flat
from mrlcache.extract import ExtractConfig
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import MRLModel


def _field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _arg_defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _option_defaults(command: str) -> dict:
    """The value each parameter of ``command`` has when not given (what the command body receives)."""
    ctx = main.commands[command].make_context(command, [], resilient_parsing=True)
    return {name: value for name, value in ctx.params.items() if name != "config"}


# command -> {option parameter name: library default it must equal}
LIBRARY = {
    "extract": {
        **{name: flat(ExtractConfig())[name] for name in (
            "mode", "views", "crop_seconds", "max_seconds", "window_seconds", "min_seconds", "seed", "shard_size", "dtype",
            "batch_size", "workers", "device", "precision", "streams", "layers_pooled", "ptm", "ptm_weights", "engine",
            "variant", "train_type", "dataset", "weights", "random_init", "eval_batch")},
        "backend": flat(ExtractConfig())["format"],
        "backbone_name": flat(ExtractConfig())["backbone"],
        "noise_dir": _field_defaults(AugmentConfig)["noise_dir"],
        "rir_dir": _field_defaults(AugmentConfig)["rir_dir"],
        "speed_perturb": _field_defaults(AugmentConfig)["speed"],
    },
    "eer": {
        "asnorm_topk": _arg_defaults(evaluate)["topk"],
        "max_seconds": _arg_defaults(pooled_from_audio)["max_seconds"],
        "window_seconds": _arg_defaults(pooled_from_audio)["window_seconds"],
        "skip_missing": _arg_defaults(pooled_from_audio)["skip_missing"],
        "device": _arg_defaults(pooled_from_audio)["device"],
    },
    "embed": {"window_seconds": MRLModel(None, MatryoshkaHead(8, (4,))).window_seconds},
    "demo": {"seed": _arg_defaults(demo_run.run_demo)["seed"]},
}

# Options with no library counterpart: inputs, outputs, and choices the command itself makes.
COMMAND_ONLY = {
    "extract": {"data", "list_file", "utt2spk", "out", "threads", "rank", "world_size", "overwrite", "quiet"},
    "eer": {"model_path", "trials_path", "cache_dir", "data_dir", "dims", "baselines", "pca_cache", "center_cache",
            "asnorm_cohort", "snorm_cohort", "calibration_path", "json_out", "plot_out"},
    "embed": {"model_path", "inputs", "dim", "out", "fmt", "max_seconds", "device", "engine", "overwrite"},
    "demo": {"out", "quick", "backbone_name", "weights", "variant"},
}


def test_every_click_default_is_the_library_default():
    problems = []
    for command in ("extract", "eer", "embed", "demo"):
        options = _option_defaults(command)
        library = LIBRARY.get(command, {})
        unknown = set(options) - set(library) - COMMAND_ONLY[command]
        problems += [f"{command} --{name}: not in the map of tests/cli/test_defaults.py" for name in unknown]
        for name, want in library.items():
            if options[name] != want:
                problems.append(f"{command} --{name}: click default {options[name]!r}, library {want!r}")
    assert not problems, "\n".join(problems)


def test_embed_defaults_are_those_of_eer_for_the_same_options():
    # embed has no library call with defaults of its own: it decodes and embeds like eer --data.
    eer, embed = _option_defaults("eer"), _option_defaults("embed")
    assert embed["max_seconds"] == eer["max_seconds"] and embed["device"] == eer["device"]
    assert embed["window_seconds"] == eer["window_seconds"] == _option_defaults("verify")["window_seconds"]


def test_demo_without_variant_is_run_demos_default_variant():
    # --variant is unset unless given (the random b0 is then used); run_demo's default is that b0.
    assert _option_defaults("demo")["variant"] is None
    assert _arg_defaults(demo_run.run_demo)["variant"] == "b0"
