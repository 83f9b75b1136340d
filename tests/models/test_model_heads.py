"""model.pt for every head: stream models (ECAPA, fusions) rebuilt by load_model, on cached streams and audio."""

import numpy as np
import pytest
import torch
from conftest import speech_like

from mrlcache import load_model, streams
from mrlcache.models.model import ModelError, save_model
from mrlcache.models.streams import StreamModel, plan_groups
from mrlcache.streams import StreamRecord

ECAPA = dict(channels=16, scale=4, mfa_channels=32, attention_bottleneck=8, se_bottleneck=8)
HANDCRAFTED = {n: StreamRecord(n, "frames", shape, "float16", 100.0, ragged=True)
               for n, shape in (("fbank", (80,)), ("f0", (2,)), ("mfcc", (40,)))}


def _trained_looking(model: StreamModel) -> StreamModel:
    """Weights and BatchNorm statistics away from their initial values, so a lost tensor shows."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=g)
            elif name.endswith("running_mean"):
                b.normal_(0.0, 0.3, generator=g)
    return model.eval()


def _waves(n=2, seconds=0.6):
    return torch.from_numpy(np.stack([speech_like(seconds, seed=i, f0=100.0 + 20 * i) for i in range(n)]))


def test_ecapa_on_handcrafted_round_trips_and_embeds_audio(tmp_path):
    torch.manual_seed(0)
    model = _trained_looking(StreamModel(plan_groups(["fbank", "f0"], HANDCRAFTED), "ecapa",
                                         dict(ECAPA, dims=[8, 16])))
    path = save_model(tmp_path / "model.pt", model)
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert raw["head"]["name"] == "ecapa" and [g["streams"] for g in raw["streams"]["groups"]] == [["fbank", "f0"]]
    assert raw["version"] == 2 and not {"dims", "pooled_dim", "inputs"} & set(raw)  # each fact once, in the record
    loaded = load_model(path)
    assert loaded.inputs == ("fbank", "f0") and loaded.dims == (8, 16)
    waves = _waves()
    # From audio: the streams computed by the registry as extract computes them.
    batch = {s: streams.compute(s, waves) for s in ("fbank", "f0")}
    with torch.no_grad():
        expected = model(batch).numpy()
    np.testing.assert_array_equal(loaded.project({k: v.numpy() for k, v in batch.items()}), expected)
    np.testing.assert_allclose(loaded(waves.numpy()), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loaded.embed_all(waves.numpy())[8], expected[:, :8], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "cross-attention", "gating"])
def test_fusion_models_round_trip_with_identical_embeddings(tmp_path, fusion):
    info = {"layers": StreamRecord("layers", "frames", (3, 8), "float16", 100.0, ragged=True), **HANDCRAFTED}
    torch.manual_seed(1)
    model = _trained_looking(StreamModel(plan_groups(["layers", "mfcc", "f0"], info), "mrl", {"dims": [4, 8]},
                                         fusion=fusion, encoder_dim=16))
    loaded = load_model(save_model(tmp_path / "model.pt", model))
    assert loaded.head.spec() == model.spec()
    g = torch.Generator().manual_seed(2)
    f0 = 100 + 20 * torch.rand(5, 1, 30, generator=g)
    f0 = torch.cat([torch.where(torch.rand(5, 1, 30, generator=g) > 0.3, f0, torch.nan),
                    torch.rand(5, 1, 30, generator=g)], dim=1)
    batch = {"layers": torch.randn(5, 3, 8, 31, generator=g), "mfcc": torch.randn(5, 40, 30, generator=g), "f0": f0}
    with torch.no_grad():
        expected = model(batch).numpy()
    np.testing.assert_array_equal(loaded.project({k: v.numpy() for k, v in batch.items()}), expected)
    # A model on layers saved without a backbone cannot compute them from audio: said so.
    with pytest.raises(ModelError, match="layers.*backbone"):
        loaded(_waves(1).numpy())


@pytest.mark.slow  # runs a ReDimNet on audio
def test_layers_model_embeds_audio_through_the_saved_backbone(tmp_path):
    from mrlcache.backbone import BackboneRecord, load_backbone, state_sha256

    backbone = load_backbone("b0", random_init=True, seed=3).eval()
    info = {"layers": StreamRecord("layers", "frames", (len(backbone.layer_dims), backbone.layer_dims[0]),
                                   "float16", 100.0, ragged=True), **HANDCRAFTED}
    torch.manual_seed(2)
    model = _trained_looking(StreamModel(plan_groups(["layers", "fbank"], info), "ecapa", dict(ECAPA, dims=[8]),
                                         fusion="gating", encoder_dim=16))
    record = BackboneRecord.random_init("b0", state_sha256(backbone))
    loaded = load_model(save_model(tmp_path / "model.pt", model, backbone=backbone, backbone_ref=record))
    waves = _waves(2, 0.5)
    with torch.no_grad():
        batch = {"layers": torch.stack(backbone.layer_outputs(waves), dim=1),
                 "fbank": streams.compute("fbank", waves)}
        expected = model(batch).numpy()
    np.testing.assert_allclose(loaded(waves.numpy()), expected, rtol=1e-5, atol=1e-5)


def test_project_refusals_name_the_streams(tmp_path):
    torch.manual_seed(0)
    model = StreamModel(plan_groups(["fbank", "f0"], HANDCRAFTED), "ecapa", dict(ECAPA, dims=[8])).eval()
    loaded = load_model(save_model(tmp_path / "model.pt", model))
    with pytest.raises(ModelError, match="missing f0"):
        loaded.project({"fbank": np.zeros((2, 80, 20), np.float32)})
    with pytest.raises(ModelError, match="reads streams fbank, f0"):
        loaded.project(np.zeros((2, 80), np.float32))


def test_unknown_head_in_a_model_file_is_refused(tmp_path):
    torch.manual_seed(0)
    model = StreamModel(plan_groups(["fbank"], HANDCRAFTED), "mrl", {"dims": [8]}, encoder_dim=8)
    path = save_model(tmp_path / "model.pt", model)
    obj = torch.load(path, weights_only=True)
    obj["head"]["name"] = "conformer"
    torch.save(obj, path)
    with pytest.raises(ModelError, match="head 'conformer' is not known"):
        load_model(path)


class _EvalStreams:
    """An eval-mode cache stand-in (the reader contract): ragged frame streams, view 0 only."""

    def __init__(self, items: dict, utterances):
        self.items, self.utterances = items, list(utterances)
        self.meta, self.skipped, self.path, self.num_views = {"mode": "eval"}, {}, "standin", 1
        self.streams = {n: StreamRecord(n, "frames", v[0].shape[:-1], "float16", 100.0, ragged=True)
                        for n, v in items.items()}

    def index_of(self, ids):
        where = {u: i for i, u in enumerate(self.utterances)}
        return np.array([where[u] for u in ids])

    def read(self, stream, view=None, rows=None, dtype=np.float32):
        if stream not in self.items:
            raise KeyError(f"stream {stream!r}: this cache holds {', '.join(self.items)}")
        rows = range(len(self.utterances)) if rows is None else rows
        return [self.items[stream][i].astype(dtype) for i in rows]


def test_eer_embeddings_from_ragged_streams_are_the_models(tmp_path):
    from mrlcache import evaluate as ev
    from mrlcache.trials import read_trials

    torch.manual_seed(0)
    model = _trained_looking(StreamModel(plan_groups(["fbank", "f0"], HANDCRAFTED), "ecapa",
                                         dict(ECAPA, dims=[8, 16])))
    loaded = load_model(save_model(tmp_path / "model.pt", model))
    waves = [torch.from_numpy(speech_like(s, seed=i)) for i, s in enumerate((0.5, 0.8, 0.6, 1.1))]
    utts = [f"id{i}/v/0.wav" for i in range(4)]
    items = {n: [streams.compute_one(n, w).numpy() for w in waves] for n in ("fbank", "f0")}
    (tmp_path / "trials.txt").write_text(f"1 {utts[0]} {utts[1]}\n0 {utts[2]} {utts[3]}\n0 {utts[0]} {utts[3]}\n")
    trials = read_trials(tmp_path / "trials.txt")
    vectors = ev.embeddings_from_cache(_EvalStreams(items, utts), loaded, trials)
    for u, emb in zip(vectors.utterances, vectors.pooled):
        i = utts.index(u)
        with torch.no_grad():  # each utterance alone, at its own length
            expected = model({n: torch.from_numpy(items[n][i])[None] for n in items})[0].numpy()
        np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)
    assert list(ev.transforms(loaded)) == ["mrl"]
    with pytest.raises(ev.EvaluateError, match="reads streams fbank, f0"):
        ev.transforms(loaded, ("mrl", "raw"))


@pytest.mark.slow  # a full CLI command on audio
def test_eer_cli_scores_a_stream_model_from_audio(tmp_path):
    import json

    from click.testing import CliRunner
    from conftest import make_tree

    from mrlcache.cli import main
    from mrlcache.metrics import eer

    torch.manual_seed(0)
    model = _trained_looking(StreamModel(plan_groups(["fbank", "f0"], HANDCRAFTED), "mrl", {"dims": [4, 8]},
                                         encoder_dim=8))
    path = save_model(tmp_path / "model.pt", model)
    paths = make_tree(tmp_path / "data", speakers=3, videos=1, utts=2, seconds=0.8)
    utts = [str(p.relative_to(tmp_path / "data")) for p in paths]
    pairs = [(a, b) for i, a in enumerate(utts) for b in utts[i + 1:]]
    lines = [f"{int(a.split('/')[0] == b.split('/')[0])} {a} {b}" for a, b in pairs]
    (tmp_path / "trials.txt").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(main, ["eer", "--model", str(path), "--trials", str(tmp_path / "trials.txt"),
                                    "--data", str(tmp_path / "data"), "--json", str(tmp_path / "eer.json")])
    assert res.exit_code == 0, res.output
    rows = {r["dim"]: r for r in json.loads((tmp_path / "eer.json").read_text())["results"]}
    loaded = load_model(path)
    from mrlcache.audio import load_audio

    emb = {u: loaded(load_audio(tmp_path / "data" / u)[None])[0].astype(np.float64) for u in utts}
    for d in (4, 8):
        cos = [emb[a][:d] @ emb[b][:d] / np.linalg.norm(emb[a][:d]) / np.linalg.norm(emb[b][:d]) for a, b in pairs]
        labels = [int(x.split()[0]) for x in lines]
        assert rows[d]["eer"] == pytest.approx(eer(np.array(cos), np.array(labels))[0], abs=1e-9)
    res = CliRunner().invoke(main, ["eer", "--model", str(path), "--trials", str(tmp_path / "trials.txt"),
                                    "--data", str(tmp_path / "data"), "--baseline", "raw"])
    assert res.exit_code != 0 and "reads streams fbank, f0" in res.output


@pytest.mark.slow  # a full CLI command on audio
def test_embed_cli_runs_a_handcrafted_model_without_a_backbone(tmp_path):
    from click.testing import CliRunner
    from conftest import write_wav

    from mrlcache.audio import load_audio
    from mrlcache.cli import main

    torch.manual_seed(0)
    model = _trained_looking(StreamModel(plan_groups(["mfcc", "f0"], HANDCRAFTED), "ecapa", dict(ECAPA, dims=[8, 16])))
    path = save_model(tmp_path / "model.pt", model)
    files = [write_wav(tmp_path / f"a{i}.wav", speech_like(0.7 + 0.2 * i, seed=i), 16000) for i in range(2)]
    res = CliRunner().invoke(main, ["embed", "--model", str(path), *map(str, files), "--dim", "8",
                                    "--out", str(tmp_path / "emb.npy")])
    assert res.exit_code == 0, res.output
    got = np.load(tmp_path / "emb.npy")
    for f, row in zip(files, got):
        wave = torch.from_numpy(load_audio(f))[None]
        with torch.no_grad():
            expected = model({n: streams.compute(n, wave) for n in ("mfcc", "f0")})[0, :8].numpy()
        np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-5)
