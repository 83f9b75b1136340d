"""``mrlcache runs``: one table comparing fit run directories."""

import json

import pytest

from mrlcache.fit import fit
from mrlcache.fit.report import run_record, runs_table
from stream_standin import stream_cache

FAST = dict(epochs=3, batch_size=32, lr=1e-2, warmup_epochs=0, margin_warmup_epochs=1, scale=16, head_only=True,
            progress=False, val_speakers=8, encoder_dim=16, ecapa_channels=16, ecapa_scale=4,
            ecapa_mfa_channels=32, ecapa_bottleneck=8)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cache = stream_cache(speakers=30, utts=4, views=2, seed=3)
    return [fit(cache, (4, 8), root / "pooled", **dict(FAST, inputs="pooled")),
            fit(cache, (8, 16), root / "gating", **dict(FAST, inputs="layers,fbank,f0", fusion="gating")),
            fit(cache, (8, 16), root / "ecapa", **dict(FAST, inputs="fbank,f0", head="ecapa"))]


def test_rows_describe_each_run(three_runs):
    pooled, gating, ecapa = (run_record(r) for r in three_runs)
    assert (pooled["inputs"], pooled["fusion"], pooled["head"], pooled["dims"]) == ("pooled", "-", "mrl", "4,8")
    assert (gating["inputs"], gating["fusion"], gating["head"]) == ("layers,fbank,f0", "gating", "mrl")
    assert (ecapa["inputs"], ecapa["head"], ecapa["dims"]) == ("fbank,f0", "ecapa", "8,16")
    for run, row in zip(three_runs, (pooled, gating, ecapa)):
        summary = json.loads((run / "summary.json").read_text())
        history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
        assert row["mean_eer"] == summary["best"]["mean_eer"]
        assert row["epochs"] == 3 == len(history)
        assert row["seconds"] == pytest.approx(sum(h["seconds"] for h in history), abs=0.1)
        for d, e in summary["best"]["eer"].items():
            assert row[f"eer@{d}"] == e and row[f"mindcf@{d}"] == summary["best"]["min_dcf"][d]


def test_table_sorts_by_the_chosen_column(three_runs):
    columns, rows = runs_table(three_runs)
    assert [r["mean_eer"] for r in rows] == sorted(r["mean_eer"] for r in rows)
    assert {"eer@4", "eer@8", "eer@16", "mindcf@16", "epochs", "seconds"} <= set(columns)
    _, rows = runs_table(three_runs, sort="eer@4")  # only the pooled run has dim 4: it first, the others after
    assert rows[0]["inputs"] == "pooled" and all("eer@4" not in r for r in rows[1:])
    _, rows = runs_table(three_runs, sort="run")
    assert [r["run"] for r in rows] == sorted(str(r) for r in three_runs)
    with pytest.raises(ValueError, match="--sort accuracy: choose a column of"):
        runs_table(three_runs, sort="accuracy")


def test_a_directory_that_is_no_run_is_refused(three_runs, tmp_path):
    with pytest.raises(ValueError, match="no config.yaml.*finished 'mrlcache fit'"):
        runs_table([three_runs[0], tmp_path])


@pytest.mark.slow  # a full CLI command
def test_runs_cli_prints_the_table_and_writes_json(three_runs, tmp_path):
    from click.testing import CliRunner

    from mrlcache.cli import main

    res = CliRunner().invoke(main, ["runs", *map(str, three_runs), "--sort", "seconds",
                                    "--json", str(tmp_path / "runs.json")])
    assert res.exit_code == 0, res.output
    for name in ("pooled", "gating", "ecapa", "layers,fbank,f0", "sorted by seconds"):
        assert name in res.output
    report = json.loads((tmp_path / "runs.json").read_text())
    assert report["sort"] == "seconds" and len(report["runs"]) == 3
    assert [r["seconds"] for r in report["runs"]] == sorted(r["seconds"] for r in report["runs"])
    res = CliRunner().invoke(main, ["runs", str(three_runs[0]), "--sort", "nope"])
    assert res.exit_code != 0 and "--sort nope" in res.output
