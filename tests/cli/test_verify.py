"""``model.verify`` and ``mrlcache verify`` on a tiny synthetic corpus (random-init b0 backbone).

The head is an LDA projection fitted here, in numpy, on the pooled vectors of the corpus's
train speakers; the calibration is fitted by the library on trials of half of the test
speakers, and the pairs verified come from the other half (speakers neither saw).
"""

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

from mrlcache.audio import load_audio
from mrlcache.backbone import load_backbone
from mrlcache.calibration import fit_calibration
from mrlcache.cli import main
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import ModelError, calibration_path, load_model, save_model
from mrlcache.runtime import sha256_file
from mrlcache.demo.synth import make_corpus

DIMS = [8, 16]


def _lda_head(pooled, speakers) -> MatryoshkaHead:
    """BatchNorm = standardisation by the training statistics, linear = regularised LDA directions."""
    mu, sd = pooled.mean(0), pooled.std(0) + 1e-3
    z = (pooled - mu) / sd
    names = sorted(set(speakers))
    groups = [z[[s == n for s in speakers]] for n in names]
    means = np.stack([g.mean(0) for g in groups])
    within = sum((g - m).T @ (g - m) for g, m in zip(groups, means))
    within += np.eye(z.shape[1]) * np.trace(within) / z.shape[1]
    between = (means - means.mean(0)).T @ (means - means.mean(0))
    _, vectors = scipy.linalg.eigh(between, within)
    head = MatryoshkaHead(pooled.shape[1], DIMS).eval()
    with torch.no_grad():
        head.bn.running_mean.copy_(torch.from_numpy(mu))
        head.bn.running_var.copy_(torch.from_numpy(sd**2 - head.bn.eps))
        head.bn.weight.fill_(1.0)
        head.bn.bias.zero_()
        head.linear.weight.copy_(torch.from_numpy(vectors[:, ::-1][:, : DIMS[-1]].T.copy()))
        head.linear.bias.zero_()
    return head


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    make_corpus(root / "corpus", speakers=16, utterances=4, test_speakers=6, seconds=(1.0, 1.2))
    backbone = load_backbone("b0", random_init=True)
    files = {split: sorted((root / "corpus" / split).rglob("*.wav")) for split in ("train", "test")}
    with torch.no_grad():
        pooled = np.stack([backbone.pooled(torch.from_numpy(load_audio(f))[None])[0].numpy()
                           for f in files["train"]]).astype(np.float64)  # (40, P)
    head = _lda_head(pooled, [f.parts[-3] for f in files["train"]])
    save_model(root / "run" / "model.pt", head, backbone=backbone)
    save_model(root / "plain" / "model.pt", head, backbone=backbone)  # never calibrated
    model = load_model(root / "run" / "model.pt")
    assert model.calibration is None
    # Test speakers: the first three calibrate, the last three are verified.
    speakers = sorted({f.parts[-3] for f in files["test"]})
    cal_files = [f for f in files["test"] if f.parts[-3] in speakers[:3]]
    emb = {f: model.embed_all(load_audio(f)[None]) for f in cal_files}
    pairs = list(itertools.combinations(cal_files, 2))
    labels = np.array([int(a.parts[-3] == b.parts[-3]) for a, b in pairs])
    scores = np.array([[_cosine(emb[a][d][0], emb[b][d][0]) for a, b in pairs] for d in DIMS])  # (2, T)
    cal = fit_calibration(scores, labels, DIMS, prior=0.01,
                          info={"model_sha256": sha256_file(root / "run" / "model.pt")})
    cal.to_json(calibration_path(root / "run" / "model.pt"))
    verify_files = [f for f in files["test"] if f.parts[-3] in speakers[3:]]
    return root, cal, verify_files


@pytest.mark.slow
def test_model_verify_api(setup):
    root, cal, files = setup
    model = load_model(root / "run" / "model.pt")
    assert model.calibration is not None and model.calibration.dims == DIMS
    waves = {f: load_audio(f) for f in files}
    same = [(a, b) for a, b in itertools.combinations(files, 2) if a.parts[-3] == b.parts[-3]]
    diff = [(a, b) for a, b in itertools.combinations(files, 2) if a.parts[-3] != b.parts[-3]]
    embedded = {f: model(w[None], 8)[0] for f, w in waves.items()}  # each file once, not once per pair
    llrs = {True: [], False: []}
    for (a, b), is_same in [(p, True) for p in same] + [(p, False) for p in diff]:
        v = model.verify(waves[a], waves[b], dim=8, prior=0.2)
        expect = _cosine(embedded[a], embedded[b])
        assert v.score == pytest.approx(expect, abs=1e-6)
        p = cal.params[8]
        assert v.llr == pytest.approx(p["a"] * expect + p["b"], rel=1e-6, abs=1e-9)
        assert v.threshold == pytest.approx(-math.log(0.2 / 0.8))  # Bayes threshold, c_miss = c_fa = 1
        assert v.accept == (v.llr >= v.threshold) and v.prior == 0.2 and v.far is None and v.note is None
        llrs[is_same].append(v.llr)
    # Speakers neither the head nor the calibration saw: same-speaker pairs score higher on
    # average (weakly: a random-init backbone and a head fitted on ten speakers).
    assert np.mean(llrs[True]) > np.mean(llrs[False])
    # Default operating point: prior 0.01, the largest dim.
    v = model.verify(waves[files[0]], waves[files[1]])
    assert v.dim == 16 and v.prior == 0.01 and v.threshold == pytest.approx(math.log(99))
    # A false-accept rate: the threshold comes from the calibration trials' non-targets.
    v = model.verify(waves[files[0]], waves[files[1]], far=0.5)
    assert v.threshold == pytest.approx(cal.threshold(16, far=0.5)) and v.prior is None


@pytest.mark.slow
def test_model_verify_without_calibration(setup, tmp_path):
    root, _, files = setup
    model = load_model(root / "plain" / "model.pt")
    assert model.calibration is None
    a, b = load_audio(files[0]), load_audio(files[1])
    v = model.verify(a, b, dim=16)
    assert v.llr is None and v.accept is None and v.threshold is None
    assert "no calibration" in v.note and "mrlcache calibrate" in v.note and "--attach" in v.note
    assert v.score == pytest.approx(_cosine(model(a[None], 16)[0], model(b[None], 16)[0]), abs=1e-6)
    # A calibration fitted for another model file is refused when loading, naming the file.
    other = tmp_path / "model.pt"
    torch.manual_seed(3)
    save_model(other, MatryoshkaHead(model.head.pooled_dim, DIMS).eval(), backbone=model.backbone)
    shutil.copy(calibration_path(root / "run" / "model.pt"), calibration_path(other))
    with pytest.raises(ModelError, match="another model.pt"):
        load_model(other)
    assert load_model(other, calibration=False).calibration is None


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_verify_cli_pairs_and_json(setup, tmp_path):
    root, cal, files = setup
    rel = [f.relative_to(root / "corpus" / "test") for f in files]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"# a comment\n{rel[0]} {rel[1]}\n\n{rel[0]} {rel[-1]}\n")
    out = tmp_path / "v.json"
    result = run("verify", "--model", root / "run/model.pt", "--pairs", pairs, "--data", root / "corpus/test",
                 "--dim", 8, "--prior", 0.05, "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["calibrated"] and len(report["pairs"]) == 2
    model = load_model(root / "run" / "model.pt")
    for row, (a, b) in zip(report["pairs"], [(files[0], files[1]), (files[0], files[-1])]):
        v = model.verify(load_audio(a), load_audio(b), 8, prior=0.05)
        assert row["score"] == pytest.approx(v.score) and row["llr"] == pytest.approx(v.llr)
        assert row["accept"] == v.accept and row["threshold"] == pytest.approx(math.log(0.95 / 0.05))
        assert ("accept" if v.accept else "reject") in result.output
    # The two-file form, on a model without calibration: the cosine and how to calibrate.
    result = run("verify", "--model", root / "plain/model.pt", files[0], files[1])
    assert result.exit_code == 0, result.output
    assert "no calibration" in result.output and "--attach" in result.output


@pytest.mark.slow
def test_verify_cli_errors(setup, tmp_path):
    root, _, files = setup
    model = root / "run/model.pt"
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("only-one-field.wav\n")
    cases = [
        ([files[0]], "two audio files"),
        ([files[0], tmp_path / "missing.wav"], "missing.wav: no such audio file"),
        ([files[0], bad], "bad.wav: cannot decode"),
        (["--pairs", pairs], "pairs.txt:1: expected two paths"),
        ([files[0], files[1], "--prior", 0.01, "--far", 0.1], "at most one of --prior and --far"),
        ([files[0], files[1], "--dim", 5], "trained for dims"),
        ([files[0], files[1], "--far", 1e-6], "false-accept rates in"),
    ]
    for extra, message in cases:
        result = run("verify", "--model", model, *extra)
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
