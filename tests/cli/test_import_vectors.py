"""``import-vectors`` and ``export-vectors`` on the command line: round trips and one-line errors.

The commands are run through a click group made here, so these tests do not depend on how
``mrlcache.cli`` registers them.
"""

from __future__ import annotations

from collections import namedtuple

import click
import kaldiio
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mrlcache import cache as cache_mod
from mrlcache import load_model
from mrlcache.cache import CacheWriter
from mrlcache.cli.export_vectors import export_vectors
from mrlcache.cli.import_vectors import import_vectors

Row = namedtuple("Row", "utt_id speaker path")
IDS = [f"id{s:05d}/v/{u:05d}.wav" for s in range(4) for u in range(3)]
SPEAKERS = [u.split("/")[0] for u in IDS]


@click.group()
def cli():
    """Test group holding the two commands."""


cli.add_command(import_vectors)
cli.add_command(export_vectors)


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def source_cache(tmp_path, views=2, dim=8):
    """A float32 cache written with CacheWriter directly (as extract would), 2 shards."""
    x = np.random.default_rng(3).standard_normal((len(IDS), views, dim)).astype(np.float32)
    meta = {"pooled_dim": dim, "views": views, "dtype": "float32", "shard_size": 7, "mode": "train"}
    manifest = [Row(u, s, f"/data/{u}") for u, s in zip(IDS, SPEAKERS)]
    with CacheWriter(tmp_path / "src", meta, manifest) as w:
        for k in range(w.num_shards):
            rows = w.shard_rows(k)
            w.write_shard(k, np.arange(rows.start, rows.stop), x[rows.start:rows.stop], {}, 1.0)
        w.finish()
    return tmp_path / "src", x


@pytest.mark.slow
@pytest.mark.parametrize("fmt,out,back", [
    ("npz", "v.npz", "v.npz"),
    ("kaldi", "xvector", "xvector.scp"),
    ("npy", "v.npy", "v.npy"),
    ("npy", "folder", "folder"),
])
def test_round_trip_cache_export_import_is_identical(tmp_path, fmt, out, back):
    src, x = source_cache(tmp_path)
    run("export-vectors", src, "--format", fmt, "--out", tmp_path / out, "--view", 1)
    extra = []
    if fmt == "kaldi":
        extra = ["--utt2spk", tmp_path / "xvector.utt2spk"]
    run("import-vectors", "--vectors", tmp_path / back, "--out", tmp_path / "back", "--dtype", "float32",
        "--name", "round-trip", *extra)
    c = cache_mod.open(tmp_path / "back")
    got = c.read("pooled", view=0)
    row = {u: i for i, u in enumerate(c.utterances)}
    assert sorted(c.utterances) == sorted(IDS)
    assert all(np.array_equal(got[row[u]], x[i, 1]) for i, u in enumerate(IDS))
    assert [c.speakers[row[u]] for u in IDS] == SPEAKERS
    assert c.meta["backbone"]["source"] == "imported:round-trip"
    assert (tmp_path / "back" / "import-config.yaml").is_file()


@pytest.mark.slow
def test_export_through_a_head_writes_kaldi_vectors_of_that_dim(tmp_path):
    from mrlcache.models.matryoshka import MatryoshkaHead
    from mrlcache.models.model import save_model

    src, x = source_cache(tmp_path)
    torch.manual_seed(1)
    head = MatryoshkaHead(8, [2, 4])
    save_model(tmp_path / "model.pt", head)
    run("export-vectors", src, "--model", tmp_path / "model.pt", "--dim", 2, "--format", "kaldi",
        "--out", tmp_path / "emb.ark")
    table = kaldiio.load_scp(str(tmp_path / "emb.scp"))
    with torch.no_grad():
        want = head.eval()(torch.from_numpy(x[:, 0]))[:, :2].numpy()
    np.testing.assert_allclose(np.stack([table[u] for u in IDS]), want, rtol=1e-6, atol=1e-6)
    result = run("export-vectors", src, "--model", tmp_path / "model.pt", "--dim", 3, "--format", "npz",
                 "--out", tmp_path / "x.npz", ok=False)
    assert result.exit_code == 1 and "--dim 3: the model was trained for dims [2, 4]" in result.output
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.slow
def test_bad_input_is_a_one_line_error_and_leaves_no_cache(tmp_path):
    x = np.ones((3, 4), np.float32)
    x[1, 2] = np.nan
    np.save(tmp_path / "v.npy", x)
    (tmp_path / "v.ids").write_text("a\nb\nc\n")
    result = run("import-vectors", "--vectors", tmp_path / "v.npy", "--ids", tmp_path / "v.ids",
                 "--out", tmp_path / "c", ok=False)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "NaN or Inf" in lines[0] and "'b'" in lines[0]
    assert not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    np.save(tmp_path / "views.npy", np.ones((3, 2, 4), np.float32))
    result = run("import-vectors", "--vectors", tmp_path / "views.npy", "--ids", tmp_path / "v.ids",
                 "--out", tmp_path / "c", ok=False)
    assert result.exit_code == 1 and "--layout views" in result.output
    result = run("import-vectors", "--vectors", tmp_path / "views.npy", "--ids", tmp_path / "v.ids",
                 "--out", tmp_path / "c", "--layout", "views", "--shard-size", 2)
    c = cache_mod.open(tmp_path / "c")
    assert c.num_views == 2 and len(list(c.iter_shards())) == 2 and c.dtype == np.float16


@pytest.mark.slow
def test_fit_and_eer_on_imported_vectors_against_raw_and_their_pca(tmp_path):
    """'A Matryoshka head on my embeddings against PCA of my embeddings' is one command each."""
    from mrlcache.cli import main

    rng = np.random.default_rng(0)
    speakers, utts, dim = 24, 6, 32
    centres = rng.standard_normal((speakers, dim))
    channel = rng.standard_normal((4, dim))  # low-rank nuisance as strong as the speaker: cosine suffers
    n = speakers * utts
    x = (np.repeat(centres, utts, axis=0) + rng.standard_normal((n, 4)) @ channel
         + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)
    ids = [f"spk{s:02d}/v{u % 2}/{u:03d}" for s in range(speakers) for u in range(utts)]
    train = [i for i, u in enumerate(ids) if int(u[3:5]) < 16]
    test = [i for i, u in enumerate(ids) if int(u[3:5]) >= 16]
    for name, rows in (("train", train), ("test", test)):
        np.save(tmp_path / f"{name}.npy", x[rows])
        (tmp_path / f"{name}.ids").write_text("\n".join(ids[i] for i in rows) + "\n")
        run("import-vectors", "--vectors", tmp_path / f"{name}.npy", "--ids", tmp_path / f"{name}.ids",
            "--out", tmp_path / f"c-{name}", "--name", "toy", "--dtype", "float32")
    lines = [f"{int(ids[a][:5] == ids[b][:5])} {ids[a]} {ids[b]}" for k, a in enumerate(test) for b in test[k + 1:]]
    (tmp_path / "trials.txt").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    # A head from scratch (--init random; the default on imported vectors starts from the vectors
    # themselves, docs/metrics.md).
    result = runner.invoke(main, ["fit", "--cache", str(tmp_path / "c-train"), "--dims", "4,8,16", "--out",
                                  str(tmp_path / "run"), "--epochs", "20", "--batch-size", "32", "--val-speakers", "0",
                                  "--init", "random", "--quiet"])
    assert result.exit_code == 0, result.output
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert model["backbone"] is None  # head-only: the vectors came from no backbone mrlcache knows
    result = runner.invoke(main, ["eer", "--model", str(tmp_path / "run" / "model.pt"), "--trials",
                                  str(tmp_path / "trials.txt"), "--cache", str(tmp_path / "c-test"),
                                  "--baseline", "raw", "--baseline", "pca", "--pca-cache", str(tmp_path / "c-train"),
                                  "--json", str(tmp_path / "eer.json")])
    assert result.exit_code == 0, result.output
    import json

    rows = json.loads((tmp_path / "eer.json").read_text())["results"]
    by = {(r["system"], r["dim"]): r["eer"] for r in rows}
    assert {s for s, _ in by} == {"mrl", "raw", "pca"}
    assert {d for s, d in by if s == "pca"} == {4, 8, 16}
    raw = by[("raw", dim)]
    # The head learned to discount the nuisance: better than the raw 32-D vectors at half the
    # size, and better than PCA of the same vectors at the same size (here 0.31 vs 0.39 and 0.46).
    assert by[("mrl", 16)] < raw - 0.05 and by[("mrl", 16)] < by[("pca", 16)] - 0.05


@pytest.mark.slow
def test_fit_refuses_imported_vectors_without_speakers(tmp_path):
    from mrlcache.cli import main

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("\n".join(f"utt{i:02d}" for i in range(12)) + "\n")  # no speaker in the ids
    run("import-vectors", "--vectors", tmp_path / "x.npy", "--ids", tmp_path / "ids.txt", "--out", tmp_path / "c")
    result = CliRunner().invoke(main, ["fit", "--cache", str(tmp_path / "c"), "--dims", "4", "--out",
                                       str(tmp_path / "run"), "--quiet"])
    assert result.exit_code != 0 and "12 of 12 utterances have no speaker" in result.output
    assert "--utt2spk" in result.output and not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.slow
def test_a_head_on_imported_layer_stacks(tmp_path):
    """(N, L, D) stacks from another trainer: a weighted layer sum + Matryoshka head fits and scores."""
    from mrlcache.cli import main

    rng = np.random.default_rng(1)
    speakers, utts, layers, dim = 16, 6, 3, 12
    centres = rng.standard_normal((speakers, dim))
    ids = [f"spk{s:02d}/v{u % 2}/{u:03d}" for s in range(speakers) for u in range(utts)]
    # The speaker shows in the last layer only; the others are noise the layer weights must learn to drop.
    x = rng.standard_normal((len(ids), layers, dim)).astype(np.float32)
    x[:, -1] += np.repeat(centres, utts, axis=0)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    run("import-vectors", "--vectors", tmp_path / "x.npy", "--ids", tmp_path / "ids.txt", "--out", tmp_path / "c",
        "--layout", "layers", "--dtype", "float32")
    result = CliRunner().invoke(main, ["fit", "--cache", str(tmp_path / "c"), "--inputs", "layers", "--dims", "4,8",
                                       "--out", str(tmp_path / "run"), "--epochs", "20", "--batch-size", "16", "--loss", "softmax",
                                       "--encoder-dim", "16", "--val-speakers", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    import json

    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert np.mean(list(history[-1]["loss"].values())) < 0.8 * np.mean(list(history[0]["loss"].values()))
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert model["backbone"] is None and [g["streams"] for g in model["streams"]["groups"]] == [["layers"]]
    assert load_model(tmp_path / "run" / "model.pt").inputs == ("layers",)  # head-only, on the layer stream
