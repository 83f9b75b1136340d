"""``eer`` on a run fitted with --fixed-baselines: a ``fixed`` row per dim and the MRL/fixed ratio."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "fit"))
from test_fit import FAST, synth_vectors, write_synth_cache  # noqa: E402

from mrlcache import cache as cache_mod  # noqa: E402
from mrlcache import evaluate as ev  # noqa: E402
from mrlcache import metrics  # noqa: E402
from mrlcache.cli import main  # noqa: E402
from mrlcache.corpus import Utterance  # noqa: E402
from mrlcache.fit import fit  # noqa: E402
from mrlcache.models.model import load_model  # noqa: E402
from mrlcache.trials import read_trials  # noqa: E402

DIMS = (4, 8, 16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eerfixed")
    write_synth_cache(root / "train", n_spk=40, utts=6, views=2, seed=1)
    pooled, spk = synth_vectors(12, 4, 1, seed=5)
    ids = [f"id{100 + s:05d}/v/{i:05d}.wav" for i, s in enumerate(spk)]
    meta = {"pooled_dim": pooled.shape[-1], "views": 1, "dtype": "float32", "shard_size": 64, "mode": "eval",
            "weights_sha256": None, "max_seconds": None}
    with cache_mod.CacheWriter(root / "eval", meta, [Utterance(u, f"/none/{u}", u[:7]) for u in ids]) as w:
        w.write_shard(0, np.arange(len(ids)), pooled, {}, 1.0)
        w.finish()
    pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    (root / "trials.txt").write_text("".join(f"{int(a[:7] == b[:7])} {a} {b}\n" for a, b in pairs))
    run = fit(root / "train", DIMS, root / "run", fixed_baselines=True, val_speakers=8, **{**FAST, "epochs": 4})
    return root, run, ids, pooled[:, 0]


def _reference_eer(model_path, ids, pooled, trials, d):
    """EER of cosines of the head's first d outputs, computed here from the cached vectors."""
    emb = load_model(model_path).project(pooled).astype(np.float64)[:, :d]
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    row = {u: i for i, u in enumerate(ids)}
    cos = np.array([x[row[a]] @ x[row[b]] for a, b in zip(trials.enroll, trials.test)])
    return metrics.eer(cos, trials.labels)[0]


def test_fixed_system_scores_each_fixed_head(setup):
    root, run, ids, pooled = setup
    model = load_model(run / "model.pt")
    fixed = ev.fixed_models(run / "model.pt", model)
    assert sorted(fixed) == list(DIMS)
    trials = read_trials(root / "trials.txt")
    v = ev.pooled_from_cache(cache_mod.open(root / "eval"), trials)
    results = ev.evaluate(v.trials, v.utterances, v.pooled, ev.transforms(model, ["mrl", "fixed"], fixed=fixed),
                          list(DIMS))
    rows = {(r["system"], r["dim"]): r for r in results}
    for d in DIMS:
        want = _reference_eer(run / "fixed" / str(d) / "model.pt", ids, pooled, v.trials, d)
        assert rows["fixed", d]["eer"] == pytest.approx(want, abs=1e-9)
        assert rows["mrl", d]["eer"] == pytest.approx(_reference_eer(run / "model.pt", ids, pooled, v.trials, d))
    ratios = ev.fixed_ratios(results)
    assert ratios == {d: pytest.approx(rows["mrl", d]["eer"] / rows["fixed", d]["eer"]) for d in DIMS}


def test_a_run_without_baselines_has_no_fixed_system(setup, tmp_path):
    root, run, _, _ = setup
    (tmp_path / "model.pt").write_bytes((run / "model.pt").read_bytes())
    model = load_model(tmp_path / "model.pt")
    assert ev.fixed_models(tmp_path / "model.pt", model) == {}
    with pytest.raises(ev.EvaluateError, match="--fixed-baselines"):
        ev.transforms(model, ["mrl", "fixed"], fixed={})
    bad = tmp_path / "fixed" / "8"
    bad.mkdir(parents=True)
    (bad / "model.pt").write_bytes((run / "fixed" / "4" / "model.pt").read_bytes())  # a dim-4 head under 8
    with pytest.raises(ev.EvaluateError, match="expected a fixed head of dim 8"):
        ev.fixed_models(tmp_path / "model.pt", model)


@pytest.mark.slow
def test_eer_cli_prints_fixed_rows_and_ratio(setup, tmp_path):
    root, run, _, _ = setup
    out = tmp_path / "eer.json"
    result = CliRunner().invoke(main, ["eer", "--model", str(run / "model.pt"), "--trials", str(root / "trials.txt"),
                                       "--cache", str(root / "eval"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "MRL/fixed" in result.output
    report = json.loads(out.read_text())
    rows = {(r["system"], r["dim"]): r for r in report["results"]}
    assert {d for s, d in rows if s == "fixed"} == set(DIMS)
    for d in DIMS:
        assert report["mrl_over_fixed_eer"][str(d)] == pytest.approx(rows["mrl", d]["eer"] / rows["fixed", d]["eer"])
    # A run without baselines refuses --baseline fixed in one line.
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "model.pt").write_bytes((run / "model.pt").read_bytes())
    result = CliRunner().invoke(main, ["eer", "--model", str(tmp_path / "alone" / "model.pt"), "--trials",
                                       str(root / "trials.txt"), "--cache", str(root / "eval"), "--baseline", "fixed"])
    assert result.exit_code != 0 and "fit it with --fixed-baselines" in result.output
