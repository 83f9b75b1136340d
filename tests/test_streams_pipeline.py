"""The multi-stream pipeline on real caches: extract streams, fit stream heads, eer, runs.

A tiny synthetic corpus and a random-init ReDimNet b0; what is checked is that every step
runs on what the step before wrote (train-mode dense frames, eval-mode ragged frames) and
that the pooled-only pipeline on the same cache is still today's.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import mrlcache.cache as cache_mod
from mrlcache.cli import main
from mrlcache.demo.synth import make_corpus

pytestmark = pytest.mark.slow

ECAPA = ["--head", "ecapa", "--ecapa-channels", "16", "--ecapa-scale", "4", "--ecapa-mfa-channels", "48",
         "--ecapa-bottleneck", "8", "--encoder-dim", "16"]
FIT = ["--dims", "8,16", "--epochs", "2", "--batch-size", "16", "--val-speakers", "2", "--quiet", "--threads", "1"]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    make_corpus(root / "corpus", speakers=10, test_speakers=3, utterances=4, seed=1, seconds=(0.8, 1.2))
    common = ["--streams", "pooled,layers,fbank,f0", "--threads", "1", "--workers", "0", "--quiet"]
    run("extract", "--data", root / "corpus" / "train", "--out", root / "train", "--random-init", "--variant", "b0",
        "--views", "2", "--crop-seconds", "0.6", *common)
    run("extract", "--data", root / "corpus" / "test", "--out", root / "test", "--weights",
        root / "train" / "backbone.pt", "--mode", "eval", *common)
    return root


def test_extracted_streams_are_dense_in_train_and_ragged_in_eval(caches):
    train, test = cache_mod.open(caches / "train"), cache_mod.open(caches / "test")
    assert set(train.streams) == set(test.streams) == {"pooled", "layers", "fbank", "f0"}
    assert not train.streams["fbank"].ragged and test.streams["fbank"].ragged
    fb = train.read("fbank", view=1)  # (N, 80, T): 0.6 s crops at 100 frames/s
    assert fb.shape[:2] == (len(train), 80) and abs(fb.shape[2] - 60) <= 2
    ragged = test.read("fbank", rows=np.array([0, 2]))
    assert len(ragged) == 2 and all(a.shape[0] == 80 for a in ragged)


def test_stream_heads_fit_score_and_compare(caches):
    runs = {"fbank_f0": ["--inputs", "fbank,f0"],
            "fusion": ["--inputs", "layers,fbank,f0", "--fusion", "gating"],
            "pooled": ["--inputs", "pooled", "--head", "mrl"]}
    for name, args in runs.items():
        extra = [] if name == "pooled" else ECAPA
        run("fit", "--cache", caches / "train", "--out", caches / name, *args, *extra, *FIT)
        assert (caches / name / "curves.png").read_bytes()[:4] == b"\x89PNG"
        run("eer", "--model", caches / name / "model.pt", "--trials", caches / "corpus" / "trials.txt",
            "--cache", caches / "test", "--json", caches / f"{name}.json")
        rows = json.loads((caches / f"{name}.json").read_text())["results"]
        assert {r["dim"] for r in rows if r["system"] == "mrl"} == {8, 16}
        assert all(0 <= r["eer"] <= 1 for r in rows)
    gates = json.loads((caches / "fusion" / "gating.json").read_text())
    assert gates  # the gate distribution per stream on validation data
    table = run("runs", *(caches / n for n in runs), "--json", caches / "runs.json")
    compared = json.loads((caches / "runs.json").read_text())
    assert len(compared) == 3 and "gating" in table.output
