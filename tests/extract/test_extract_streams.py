"""extract --streams: shapes, frame rates, views shared with the backbone, resume, refusals."""

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mrlcache.cache
from mrlcache import streams
from mrlcache.audio import load_audio
from mrlcache.augment import make_view
from mrlcache.cli import main
from mrlcache.demo.synth import make_corpus

COMMON = ["--random-init", "--variant", "b0", "--workers", "0", "--quiet", "--seed", "3", "--threads", "1",
          "--shard-size", "4"]
TRAIN = ["--views", "2", "--crop-seconds", "1.0"]
ALL = "pooled,layers,fbank,mfcc,f0"


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, speakers=4, utterances=3, seconds=(1.0, 1.6), test_speakers=2)
    return out / "train"


def run(args, ok=True):
    result = CliRunner().invoke(main, ["extract", *args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def shard_bytes(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted((path / "shards").rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_train_streams_shapes_rates_and_views(corpus, tmp_path):
    run(["--data", str(corpus), "--out", str(tmp_path / "c"), "--streams", ALL, *TRAIN, *COMMON])
    c = mrlcache.cache.open(tmp_path / "c", verify=True)
    info = c.streams
    assert info["fbank"].shape == (80,) and info["mfcc"].shape == (40,) and info["f0"].shape == (2,)
    assert info["layers"].shape[1] == 600 and info["layers"].frame_rate == 100.0  # b0: F*C = 600
    assert all(info[s].dtype == "float16" for s in info)
    assert info["fbank"].frames == 98 and info["layers"].frames == 101  # 1 s crops
    fbank = c.read("fbank")
    assert fbank.shape == (len(c), 2, 80, 98)
    # The fbank of view 0 (clean) of row 2 is the fbank of the crop the backbone saw.
    utt = c.utterances[2]
    paths = {p.relative_to(corpus).as_posix(): p for p in corpus.rglob("*.wav")}
    crop = make_view(load_audio(paths[utt]), utt, 0, seed=3, crop_samples=16000, augmenter=None)
    want = streams.compute_one("fbank", torch.from_numpy(crop)).numpy()
    np.testing.assert_allclose(fbank[2, 0], want, rtol=2e-3, atol=2e-2)  # float16 storage
    # pooled equals a pooled-only extract's pooled, whose shards and settings keep today's format
    run(["--data", str(corpus), "--out", str(tmp_path / "p"), *TRAIN, *COMMON])
    p = mrlcache.cache.open(tmp_path / "p")
    np.testing.assert_array_equal(p.read("pooled"), c.read("pooled"))
    assert "streams" not in p.meta and p.streams.keys() == {"pooled"}
    assert "stream_bytes" in c.meta["summary"] and "stream_bytes" not in p.meta["summary"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_eval_streams_are_ragged_and_match_the_registry(corpus, tmp_path, backend):
    run(["--data", str(corpus), "--out", str(tmp_path / "c"), "--mode", "eval", "--format", backend,
         "--streams", "fbank,f0,layers,pooled", *COMMON])
    c = mrlcache.cache.open(tmp_path / "c", verify=True)
    assert c.streams["fbank"].ragged and not c.streams["pooled"].ragged
    paths = {p.relative_to(corpus).as_posix(): p for p in corpus.rglob("*.wav")}
    wave = torch.from_numpy(load_audio(paths[c.utterances[1]]))
    fbank, f0 = c.read("fbank", rows=[1])[0], c.read("f0", rows=[1])[0]
    want = streams.compute_one("fbank", wave)
    assert fbank.shape == tuple(want.shape) == (80, streams.num_frames("fbank", len(wave)))
    np.testing.assert_allclose(fbank, want.numpy(), rtol=2e-3, atol=2e-2)  # float16 storage
    track = streams.compute_one("f0", wave).numpy()
    np.testing.assert_array_equal(np.isnan(f0[0]), np.isnan(track[0]))  # unvoiced marked as tracked
    np.testing.assert_allclose(f0[0], track[0], rtol=1e-3)
    layers = c.read("layers", rows=[1])[0]
    assert layers.shape[-1] == len(wave) // 160 + 1


@pytest.mark.slow
def test_eval_streams_of_a_long_file_come_window_by_window(corpus, tmp_path):
    from mrlcache.backbone import load_backbone
    from mrlcache.streams import windows

    for layers_pooled in (False, True):
        out = tmp_path / f"c{int(layers_pooled)}"
        run(["--data", str(corpus), "--out", str(out), "--mode", "eval", "--streams", "pooled,layers,fbank",
             "--dtype", "float32", "--window-seconds", "1", *(["--layers-pooled"] if layers_pooled else []), *COMMON])
        c = mrlcache.cache.open(out)
        model = load_backbone(str(out / "backbone.pt"))
        paths = {p.relative_to(corpus).as_posix(): p for p in corpus.rglob("*.wav")}
        longest = max(range(len(c.utterances)), key=lambda i: len(load_audio(paths[c.utterances[i]])))
        wave = torch.from_numpy(load_audio(paths[c.utterances[longest]]))[None]
        assert wave.shape[-1] > 16000 and c.meta["summary"]["windowed_files"][c.utterances[longest]] == 2
        torch.set_num_threads(1)
        with torch.no_grad():
            layers, pooled = windows.layers(model, wave, 1.0, stats=layers_pooled, with_pooled=True)
        np.testing.assert_allclose(c.read("pooled", view=0, rows=[longest])[0], pooled[0].numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c.read("layers", view=0, rows=[longest])[0], layers[0].numpy(),
                                   rtol=1e-5, atol=1e-6)
        fbank = c.read("fbank", view=0, rows=[longest])[0]
        np.testing.assert_allclose(fbank, streams.compute_one("fbank", wave[0]).numpy(), rtol=1e-6)  # one pass


@pytest.mark.slow
def test_resume_after_deleting_a_shard_gives_the_same_cache(corpus, tmp_path):
    args = ["--data", str(corpus), "--out", str(tmp_path / "c"), "--streams", "layers,fbank,f0", *TRAIN, *COMMON]
    run(args)
    before = shard_bytes(tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "shards" / "shard-00001.zarr")
    run(args)
    assert shard_bytes(tmp_path / "c") == before
    changed = run(["--data", str(corpus), "--out", str(tmp_path / "c"), "--streams", "fbank", *TRAIN, *COMMON],
                  ok=False)
    assert changed.exit_code != 0 and "streams" in changed.output


@pytest.mark.slow
def test_layers_pooled_is_mean_and_std_of_the_frames(corpus, tmp_path):
    run(["--data", str(corpus), "--out", str(tmp_path / "f"), "--streams", "layers", "--dtype", "float32",
         *TRAIN, *COMMON])
    run(["--data", str(corpus), "--out", str(tmp_path / "s"), "--streams", "layers", "--layers-pooled",
         "--dtype", "float32", *TRAIN, *COMMON])
    frames = mrlcache.cache.open(tmp_path / "f").read("layers")  # (N, V, L, D, T)
    c = mrlcache.cache.open(tmp_path / "s")
    assert c.streams["layers"].kind == "vector" and c.streams["layers"].shape == (6, 1200)
    stats = c.read("layers")
    np.testing.assert_allclose(stats[..., :600], frames.mean(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats[..., 600:], frames.std(-1), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--ptm", "wavlm-base-plus", "--streams", "pooled,layers"], "--ptm wavlm-base-plus has none"),
    (["--streams", "fbank", "--layers-pooled", "--variant", "b0"], "add layers to --streams"),
    (["--streams", "pooled,spectrum", "--variant", "b0"], "unknown stream 'spectrum'"),
    (["--ptm-weights", __file__, "--variant", "b0"], "--ptm-weights needs --ptm"),
])
def test_stream_options_are_refused_in_one_line(tmp_path, args, message):
    result = run(["--data", str(tmp_path), "--out", str(tmp_path / "c"), *args], ok=False)
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "c").exists()


def test_projected_sizes_are_stated_and_match_what_is_written(corpus, tmp_path):
    """extract states each stream's projected size first; dense streams are exact up to the
    last chunk of each view (stored whole), pooled exactly."""
    res = run(["--data", str(corpus), "--out", str(tmp_path / "c"), "--streams", "pooled,fbank,layers",
               "--layers-pooled", *TRAIN, *COMMON])
    line = next(x for x in res.output.splitlines() if x.startswith("projected cache size:"))
    assert "pooled" in line and "fbank" in line and "layers" in line
    written = mrlcache.cache.read_meta(tmp_path / "c")["summary"]["stream_bytes"]
    from mrlcache.backbone import CONFIGS, ReDimNet
    from mrlcache.corpus import scan_tree
    from mrlcache.extract.config import ExtractConfig
    from mrlcache.extract.sizes import projected_sizes

    cfg = ExtractConfig.of(mode="train", views=2, crop_seconds=1.0, streams="pooled,fbank,layers", layers_pooled=True)
    sizes = projected_sizes(scan_tree(corpus), cfg, ReDimNet(CONFIGS["b0"]), None)
    assert sizes["pooled"] == written["pooled"]
    assert sizes["layers"] == written["layers"]
    c = mrlcache.cache.open(tmp_path / "c")
    per_row = 2 * 80 * c.streams["fbank"].frames * 2  # views x bins x frames x float16
    assert sizes["fbank"] <= written["fbank"] <= sizes["fbank"] + len(c.shards) * per_row


def test_a_cache_bigger_than_the_free_disk_is_refused_before_work(corpus, tmp_path, monkeypatch):
    import collections

    import mrlcache.extract.sizes as sizes

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sizes.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    res = run(["--data", str(corpus), "--out", str(tmp_path / "c"), "--streams", "pooled,layers", *TRAIN, *COMMON],
              ok=False)
    assert res.exit_code != 0
    message = [x for x in res.output.splitlines() if x.startswith("Error:")]
    assert len(message) == 1 and "GB are free on its disk" in message[0]
    assert "--layers-pooled" in message[0] and "fewer --views (now 2)" in message[0]
    assert not (tmp_path / "c").exists()  # nothing written
