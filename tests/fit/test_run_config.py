"""A run's config: options nested by component (mrlcache.components), and the flat config.yaml
of earlier versions still resumes (converted in one place, mrlcache.fit.config.flat_options)."""

from pathlib import Path

import pytest
import torch
import yaml

from mrlcache.components import flat, flatten, leaves, plain
from mrlcache.fit import EndToEndConfig, FitConfig, FitError, fit
from mrlcache.fit.config import flat_options, make_configs
from test_fit import DIMS, FAST, write_synth_cache

FLAT = Path(__file__).parent / "data" / "config-flat.yaml"  # written by the version before the nesting


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("runcfg")
    write_synth_cache(root / "train", n_spk=64, utts=8, views=3, seed=1)  # as the fixture's fit
    return root / "train"


def test_config_yaml_is_nested_by_component(train_cache, tmp_path):
    run = fit(train_cache, DIMS, tmp_path / "run", **dict(FAST, epochs=1, seed=5))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["head"]["dims"] == list(DIMS) and config["head"]["name"] == "mrl"
    assert (config["optim"]["lr"], config["loss"]["scale"], config["run"]["seed"]) == (1e-2, 16, 5)
    assert (config["mode"], config["world_size"], config["end_to_end"]) == ("cache", 1, None)
    assert "lr" not in config  # no option written twice


def test_a_flat_config_of_the_previous_version_resumes(train_cache, tmp_path):
    """The same fit as the fixture's, its config.yaml replaced by the fixture: --resume accepts it
    (and still refuses a changed option, named by its flat key)."""
    opts = dict(FAST, epochs=2, seed=5)
    run = fit(train_cache, DIMS, tmp_path / "run", **opts)
    (run / "config.yaml").write_text(FLAT.read_text())
    with pytest.raises(FitError, match=r"options differ from .*config.yaml: lr$"):
        fit(train_cache, DIMS, run, resume=True, **dict(opts, epochs=3, lr=0.02))
    fit(train_cache, DIMS, run, resume=True, **dict(opts, epochs=3))
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3
    # The flat file and this version's nested one say the same, option by option.
    old = flat_options(yaml.safe_load(FLAT.read_text()))
    new = flat_options(yaml.safe_load((run / "config.yaml").read_text()))
    # Options added since (e.g. shuffle_gb) are absent from the old file: a resume reads them
    # as today's defaults, which this version's file holds.
    defaults = {k: plain(v) for k, v in flat(FitConfig()).items()}
    added = sorted(set(new) - set(old))
    assert added == ["shuffle_gb"] and all(new[k] == defaults[k] for k in added)
    assert {k: v for k, v in old.items() if k not in ("epochs", "cache")} == \
        {k: v for k, v in new.items() if k not in ("epochs", "cache", *added)}


def test_nested_and_flat_options_are_one_conversion():
    nested = {"optim": {"lr": 0.5}, "head": {"name": "ecapa", "dims": [8, 16]}, "loss": {"loss": "softmax"}}
    assert flat_options(nested) == {"lr": 0.5, "head": "ecapa", "dims": [8, 16], "loss": "softmax"}
    assert flat_options({"lr": 0.5, "head": "ecapa"}) == {"lr": 0.5, "head": "ecapa"}  # flat passes as it is
    with pytest.raises(FitError, match="lr and optim.lr set the same option"):
        flat_options({"lr": 0.1, "optim": {"lr": 0.2}})
    with pytest.raises(FitError, match=r"optim.margin: not an option of optim \(it has batch_size"):
        flat_options({"optim": {"margin": 0.2}})
    cfg, _ = make_configs((8, 16), {"optim": {"lr": 0.5}, "head": {"init": "random"}, "seed": 3})
    assert (cfg.optim.lr, cfg.head.init, cfg.run.seed, cfg.head.dims) == (0.5, "random", 3, (8, 16))
    # Every option has one flat key, and flattening the nested form gives back every one.
    assert flatten(FitConfig, FitConfig().to_dict()) == {k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in flat(FitConfig()).items()}
    assert len(leaves(FitConfig)) == len(flat(FitConfig()))
    assert not set(leaves(FitConfig)) & set(leaves(EndToEndConfig))  # make_configs routes a key to one of them


def test_head_options_are_declared_by_the_head():
    """--margins, --grad-scaling, --fixed-baselines and the published start: only for the heads whose
    mrlcache.models.HEAD_SUPPORTS entry names them."""
    from mrlcache.models import HEAD_SUPPORTS, HEADS

    assert set(HEAD_SUPPORTS) <= set(HEADS)
    for option, value, flag in (("margins", (0.1, 0.2), "--margins"), ("grad_scaling", True, "--grad-scaling"),
                                ("fixed_baselines", True, "--fixed-baselines"),
                                ("init", "published", "--init published")):
        make_configs((8, 16), {"head": "mrl", option: value})
        with pytest.raises(FitError, match=f"{flag}.*not an option of --head ecapa; use --head mrl"):
            make_configs((8, 16), {"head": "ecapa", option: value})


def test_a_resume_may_change_the_memory_budget_not_the_shuffle(train_cache, tmp_path):
    """--memory-gb only chooses how rows are read: a fit started in memory resumes streamed
    and ends as the uninterrupted fit; --shuffle-gb sets the order, so changing it is refused."""
    opts = dict(FAST, epochs=1)
    run = fit(train_cache, DIMS, tmp_path / "run", **opts)
    with pytest.raises(FitError, match=r"options differ from .*config.yaml: shuffle_gb$"):
        fit(train_cache, DIMS, run, resume=True, **dict(opts, epochs=2, shuffle_gb=1e-5))
    fit(train_cache, DIMS, run, resume=True, **dict(opts, epochs=2, memory_gb=1e-5))
    whole = fit(train_cache, DIMS, tmp_path / "whole", **dict(opts, epochs=2))
    a, b = (torch.load(r / "last.pt", weights_only=True)["head"] for r in (run, whole))
    assert all(torch.equal(a[k], b[k]) for k in a)
