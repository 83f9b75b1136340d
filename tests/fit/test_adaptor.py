"""Heads started from the published embedding: warm start, Matryoshka adaptor, LDA (issue 21)."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from test_fit import FAST, POOLED, synth_vectors

from mrlcache import cache
from mrlcache.baselines import fit_lda
from mrlcache.corpus import Utterance
from mrlcache.fit import fit
from mrlcache.fit.adaptor import AdaptorLoss, adaptor_embed, affine_of, start_rotation, warm_map
from mrlcache.models.adaptor import AdaptorHead, WarmHead

EMBED = 12


def published_layer(seed=0):
    """An encoder's embedding layer like ReDimNet's: BN + Linear + BN, in eval mode with
    non-trivial running statistics (affine, not a plain matrix)."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Sequential(torch.nn.BatchNorm1d(POOLED), torch.nn.Linear(POOLED, EMBED),
                                torch.nn.BatchNorm1d(EMBED))
    with torch.no_grad():
        for bn in (layer[0], layer[2]):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return layer.eval()


def cosines(emb):
    e = F.normalize(torch.as_tensor(emb, dtype=torch.float64), dim=1)
    return e @ e.T


@pytest.fixture(scope="module")
def data():
    pooled, spk = synth_vectors(20, 6, 1, seed=3)
    x = torch.from_numpy(pooled[:, 0])
    layer = published_layer()
    with torch.no_grad():
        published = layer(x)
    return x, spk, layer, published


class Encoder(torch.nn.Module):
    """An encoder whose embedding layer is a method, as ``backbone.head`` is."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def head(self, pooled):
        return self.layer(pooled)


def test_probed_affine_map_is_the_layer(data):
    x, _, layer, published = data
    for fn in (layer, Encoder(layer).eval().head):
        w, b = affine_of(fn, POOLED)
        np.testing.assert_allclose(x.double().numpy() @ w.T + b, published.double().numpy(), rtol=1e-5, atol=1e-5)
    assert next(layer.parameters()).dtype == torch.float32  # probed on a copy


@pytest.mark.parametrize("rotation", ["pca", "lda"])
def test_warm_start_reproduces_published_scores_at_full_size(data, rotation):
    x, spk, layer, published = data
    w, b = affine_of(layer, POOLED)
    emb = x.double().numpy() @ w.T + b
    q = start_rotation(emb, spk, rotation)
    np.testing.assert_allclose(q @ q.T, np.eye(EMBED), atol=1e-10)
    head = WarmHead(POOLED, (4, 8, EMBED, EMBED + 6), EMBED)
    head.set_map(*warm_map(w, b, q, x.numpy(), EMBED + 6, seed=0))
    with torch.no_grad():
        out = head(x)
    # Full (published) size: the same cosine scores as the published embedding.
    torch.testing.assert_close(cosines(out[:, :EMBED]), cosines(published), atol=2e-5, rtol=0)
    # The prefixes are the rotated embedding's, so not the published prefixes.
    assert (cosines(out[:, :4]) - cosines(published[:, :4])).abs().max() > 0.05
    # Extra dims: directions of the pooled space orthogonal to the published map's rows.
    extra = head.linear.weight[EMBED:].double() / head.scale.double()  # in raw pooled units
    assert (extra @ torch.from_numpy(w).T).abs().max() < 1e-6 * extra.abs().max() * np.abs(w).max() * POOLED
    assert extra.norm(dim=1).min() > 0


def test_rotation_only_adaptor_keeps_published_scores_while_training(data):
    x, spk, layer, published = data
    w, b = affine_of(layer, POOLED)
    q = start_rotation(x.double().numpy() @ w.T + b, spk, "pca")
    head = AdaptorHead(POOLED, (2, 4, 8), EMBED)
    head.set_map(w, b, q)
    start = head(x).detach()
    loss_fn = AdaptorLoss((2, 4, 8), EMBED, topk=5)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    embed = adaptor_embed(head)
    before = loss_fn(embed(x), None)[0].item()
    for _ in range(30):
        loss, _, _ = loss_fn(embed(x), None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = head(x)
    assert loss.item() < before  # it learns ...
    assert (cosines(out[:, :4]) - cosines(start[:, :4])).abs().max() > 1e-3  # ... a new rotation ...
    torch.testing.assert_close(cosines(out), cosines(published), atol=2e-5, rtol=0)  # ... same full scores


def direct_lda(x, labels):
    """LDA written out: scatter matrices by loops over classes, then scipy's generalised
    eigenproblem. Returns (mean, directions by column most discriminant first, eigenvalues)."""
    classes = np.unique(labels)
    mu = x.mean(0)
    sw = sum((x[labels == c] - x[labels == c].mean(0)).T @ (x[labels == c] - x[labels == c].mean(0))
             for c in classes) / len(x)
    sb = sum((labels == c).sum() * np.outer(x[labels == c].mean(0) - mu, x[labels == c].mean(0) - mu)
             for c in classes) / len(x)
    values, direct = scipy.linalg.eigh(sb, sw)
    return mu, direct[:, ::-1], values[::-1], sb


def test_lda_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    classes, per, dim = 6, 40, 5
    means = 3 * rng.standard_normal((classes, dim))
    mix = rng.standard_normal((dim, dim))
    labels = np.repeat(np.arange(classes), per)
    x = means[labels] + rng.standard_normal((classes * per, dim)) @ mix
    mean, v = fit_lda(x, labels.astype(str))
    mu, direct, values, sb = direct_lda(x, labels)
    np.testing.assert_allclose(mean, mu, atol=1e-12)
    for k in range(dim):  # same directions up to sign, same scale (V^T Sw V = I)
        sign = np.sign(direct[:, k] @ v[:, k])
        np.testing.assert_allclose(v[:, k], sign * direct[:, k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(v.T @ sb @ v, np.diag(values), rtol=1e-5, atol=1e-6)


def test_lda_past_classes_minus_one_does_not_depend_on_the_row_order():
    """With fewer classes than dims the solver's basis of the null space of Sb is arbitrary;
    fit_lda fixes it (Sw-orthonormal, by Euclidean norm), so permuted rows give the same LDA."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 30)) @ rng.standard_normal((30, 30))
    labels = np.repeat(np.arange(10), 20)
    _, v = fit_lda(x, labels)
    order = rng.permutation(len(x))
    _, permuted = fit_lda(x[order], labels[order])
    np.testing.assert_allclose(np.abs(v), np.abs(permuted), rtol=1e-6, atol=1e-9)
    sw = sum(np.cov(x[labels == c].T, bias=True) * 20 for c in range(10)) / len(x)
    np.testing.assert_allclose(v.T @ sw @ v, np.eye(30), atol=1e-5)  # up to the 1e-9 ridge
    norms = np.linalg.norm(v[:, 9:], axis=0)
    assert np.all(np.diff(norms) >= -1e-9)  # the null directions, smallest Euclidean norm first


def test_whitened_start_scores_as_the_lda_baseline_at_every_dim(data):
    """--init-rotation whitened: at epoch 0 every prefix is the whitened LDA of the published
    embedding (eer --baseline lda), checked against LDA written out with scipy."""
    from mrlcache.fit.adaptor import start_maps
    from mrlcache.fit.config import make_configs

    x, spk, layer, published = data
    w, b = affine_of(layer, POOLED)
    dims = (2, 4, 8, EMBED, EMBED + 4)
    head = WarmHead(POOLED, dims, EMBED)
    head.set_map(*start_maps(make_configs(dims, {})[0], (w, b), x.numpy(), spk, ("whitened",))["whitened"])
    with torch.no_grad():
        out = head(x).double()
    emb = published.double().numpy()
    mu, direct, _, _ = direct_lda(emb, spk)
    want = (emb - mu) @ direct  # sign flips of a column leave every cosine unchanged
    for d in dims[:-1]:  # every prefix up to the published size, the full size too
        torch.testing.assert_close(cosines(out[:, :d]), cosines(want[:, :d]), atol=1e-4, rtol=0)
    # It is not the published geometry (a rotation would keep the full-size cosines).
    assert (cosines(out[:, :EMBED]) - cosines(published)).abs().max() > 0.05


def test_pick_start_keeps_the_published_size_no_worse_than_a_rotation():
    from mrlcache.fit.adaptor import pick_start

    # whitened wins at 4 and 8 but loses at the published size 12: a rotation is kept, the
    # one with the lower mean ratio to the best start per dim (lda: 1.2, 1.1, 1 against pca's 1.5, 1.3, 1).
    eers = {"pca": {"4": 0.30, "8": 0.13, "12": 0.10}, "lda": {"4": 0.24, "8": 0.11, "12": 0.10},
            "whitened": {"4": 0.20, "8": 0.10, "12": 0.11}}
    assert pick_start(eers, "12") == "lda"
    eers["whitened"]["12"] = 0.10  # now no worse at the published size: kept
    assert pick_start(eers, "12") == "whitened"
    assert pick_start(eers, None) == "whitened"


def test_selection_ratio_refuses_any_dim_worse_and_gains_within_the_noise():
    from mrlcache.fit.loop import selection_ratio

    start = {"4": 0.20, "8": 0.10}
    # 400 target trials: standard errors sqrt(.2 * .8 / 400) = .02 and sqrt(.1 * .9 / 400) = .015.
    assert selection_ratio({"4": 0.15, "8": 0.10}, start, 400) == pytest.approx((0.75 + 1.0) / 2)  # 2.5 se, 0
    assert selection_ratio({"4": 0.01, "8": 0.1001}, start, 400) is None  # far better at 4, worse at 8
    assert selection_ratio({"4": 0.19, "8": 0.09}, start, 400) is None  # .5 and .67 se: within the noise
    assert selection_ratio({"4": 0.19, "8": 0.09}, start, 40000) == pytest.approx((0.95 + 0.9) / 2)  # 5 and 6.7 se
    assert selection_ratio(dict(start), start, 400) is None


def write_imported(out, n_spk, seed, views=2):
    """A cache like import-vectors writes: fixed-size vectors of no known backbone."""
    pooled, spk = synth_vectors(n_spk, 6, views, seed)
    manifest = [Utterance(f"id{s:05d}/v/{i:05d}.wav", f"/none/{i}.wav", f"id{s:05d}") for i, s in enumerate(spk)]
    meta = {"model_config": None, "pooled_dim": POOLED, "sample_rate": 16000, "mode": "imported",
            "views": views, "seed": seed, "dtype": "float32", "shard_size": 64}
    with cache.CacheWriter(out, meta, manifest) as writer:
        for k in range(writer.num_shards):
            rows = list(writer.shard_rows(k))
            writer.write_shard(k, rows, pooled[rows], {}, seconds=0.0)
        writer.finish()
    return pooled


def test_warm_start_never_selects_worse_than_epoch_0_at_full_size(tmp_path):
    from mrlcache.model import load_model

    pooled = write_imported(tmp_path / "c", 40, seed=1)
    # A learning rate that wrecks the start: the guard must keep epoch 0's full-size EER.
    run = fit(tmp_path / "c", (4, 16, POOLED), tmp_path / "run", init="published", init_rotation="pca",
              init_center=False, **{**FAST, "epochs": 3, "lr": 1.0, "warmup_epochs": 0})
    summary = json.loads((run / "summary.json").read_text())
    full = str(POOLED)
    assert summary["guard_dim"] == POOLED
    assert summary["best"]["eer"][full] <= summary["start"]["eer"][full]
    # Epoch 0 scores the imported vectors themselves at full size (an identity published map).
    model = load_model(run / "model.pt")
    if summary["best_epoch"] == -1:
        x = pooled[:, 0]
        torch.testing.assert_close(cosines(model.project(x, POOLED)), cosines(x), atol=2e-5, rtol=0)


def test_selection_never_keeps_an_epoch_worse_than_epoch_0_at_any_dim(tmp_path):
    """Started heads: the selected epoch is epoch 0 or one no worse than it at every dim
    (checked against history.jsonl)."""
    write_imported(tmp_path / "c", 40, seed=3)
    dims = (4, 8, 16, POOLED)
    for lr in (1e-2, 1.0):
        run = fit(tmp_path / "c", dims, tmp_path / f"run-{lr}", init="published", init_rotation="pca",
                  **{**FAST, "epochs": 4, "lr": lr, "warmup_epochs": 0})
        summary = json.loads((run / "summary.json").read_text())
        start = summary["start"]["eer"]
        history = {h["epoch"]: h for h in map(json.loads, (run / "history.jsonl").read_text().splitlines())}
        best = summary["best_epoch"]
        if best != -1:
            assert history[best]["val_eer"] == summary["best"]["eer"]
        for d in dims:
            assert summary["best"]["eer"][str(d)] <= start[str(d)]


def test_whitened_start_kept_at_epoch_0_is_the_lda_of_every_training_speaker(tmp_path):
    """Epoch 0 selected: model.pt is the whitened LDA start fitted again on every speaker of the
    cache (held-out ones too), as eer --baseline lda fits it; checked against LDA written out."""
    from mrlcache.model import load_model

    pooled = write_imported(tmp_path / "c", 40, seed=4)
    dims = (4, 16, POOLED)
    run = fit(tmp_path / "c", dims, tmp_path / "run", init="published", init_rotation="whitened",
              **{**FAST, "epochs": 2, "lr": 5.0, "warmup_epochs": 0})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == -1 and summary["start_refit_on_every_speaker"]
    n, views = pooled.shape[:2]
    spk = np.repeat(np.asarray(cache.open(tmp_path / "c").speakers), views)
    x = pooled.reshape(n * views, POOLED).astype(np.float64)
    mu, direct, _, _ = direct_lda(x, spk)
    test = pooled[:, 0]
    got = load_model(run / "model.pt").project(test)
    want = (test - mu) @ direct
    for d in dims:
        torch.testing.assert_close(cosines(got[:, :d]), cosines(want[:, :d]), atol=2e-4, rtol=0)


def test_auto_start_scores_every_start_and_records_its_pick(tmp_path):
    write_imported(tmp_path / "c", 30, seed=5)
    run = fit(tmp_path / "c", (4, 16, POOLED), tmp_path / "run", init="published", **{**FAST, "epochs": 1})
    summary = json.loads((run / "summary.json").read_text())
    picked = summary["start_pick"]
    assert set(picked["eer"]) == {"pca", "lda", "whitened", "pca-centred"}
    assert picked["kept"] in picked["eer"]
    assert summary["start"]["eer"] == pytest.approx(picked["eer"][picked["kept"]])


def test_pca_centred_start_scores_as_the_pca_baseline_at_every_dim(data):
    """The auto candidate pca-centred: every prefix is eer's pca baseline, (e - mean) @ V[:, :d]
    with V the covariance eigenvectors (numpy's eigh of the covariance written out)."""
    from mrlcache.fit.adaptor import start_maps
    from mrlcache.fit.config import make_configs

    x, spk, layer, published = data
    w, b = affine_of(layer, POOLED)
    dims = (2, 4, 8, EMBED)
    head = WarmHead(POOLED, dims, EMBED)
    head.set_map(*start_maps(make_configs(dims, {})[0], (w, b), x.numpy(), spk, ("pca-centred",))["pca-centred"])
    with torch.no_grad():
        out = head(x).double()
    emb = published.double().numpy()
    centred = emb - emb.mean(0)
    values, vectors = np.linalg.eigh(np.cov(centred.T))
    want = centred @ vectors[:, ::-1]
    for d in dims:
        torch.testing.assert_close(cosines(out[:, :d]), cosines(want[:, :d]), atol=1e-4, rtol=0)


def test_adaptor_fit_writes_a_model_that_reloads(tmp_path):
    from mrlcache.model import load_model

    pooled = write_imported(tmp_path / "c", 30, seed=2)
    x = pooled[:, 0]
    for center in (False, True):
        run = fit(tmp_path / "c", (4, 16), tmp_path / f"run-{center}", objective="adaptor", init_center=center,
                  **{**FAST, "epochs": 2})
        model = load_model(run / "model.pt")
        assert model.project(x, 4).shape == (len(x), 4)
        with torch.no_grad():
            whole = model.head(torch.from_numpy(x))
        # Rotation only: the full-size scores are the imported vectors' (minus their training
        # mean with init_center), whatever epoch was kept.
        shift = -model.head.base_bias.numpy()
        if center:
            np.testing.assert_allclose(shift, pooled.reshape(-1, POOLED).mean(0), atol=0.5)
            assert np.abs(shift).max() > 1.0  # the synthetic vectors have a large common offset
        else:
            assert not shift.any()
        torch.testing.assert_close(cosines(whole), cosines(x - shift), atol=2e-5, rtol=0)


def test_probed_affine_map_of_a_redimnet_head():
    from conftest import TINY

    from mrlcache.backbone.redimnet import ReDimNet

    torch.manual_seed(0)
    backbone = ReDimNet(TINY).eval()
    with torch.no_grad():  # running statistics that are not the identity
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, backbone.pooled_dim)
    w, b = affine_of(backbone.head, backbone.pooled_dim)
    with torch.no_grad():
        want = backbone.head(x).double().numpy()
    np.testing.assert_allclose(x.double().numpy() @ w.T + b, want, rtol=1e-4, atol=1e-4)


def test_lda_start_with_fewer_speakers_than_dims_says_so(tmp_path, capsys):
    """LDA orders only speakers - 1 directions: a start past them is noted, not silent."""
    write_imported(tmp_path / "c", 6, seed=2)
    fit(tmp_path / "c", (4, POOLED), tmp_path / "run", init="published", init_rotation="lda",
        **{**FAST, "epochs": 1, "val_speakers": 2})
    err = capsys.readouterr().err
    assert "--init-rotation lda: 4 training speakers order only the first 3 directions" in err


def test_a_started_head_resumes_with_its_epoch_0_bound(tmp_path):
    """--resume of a warm start: epoch 0's EERs come back from last.pt (the bound the later
    epochs are held to), the same run as one without the interruption."""
    write_imported(tmp_path / "c", 30, seed=6)
    opts = dict(init="published", init_rotation="pca", **{**FAST, "epochs": 3})
    whole = fit(tmp_path / "c", (4, POOLED), tmp_path / "whole", **opts)
    part = fit(tmp_path / "c", (4, POOLED), tmp_path / "part", **{**opts, "epochs": 2})
    part = fit(tmp_path / "c", (4, POOLED), tmp_path / "part", resume=True, **opts)
    a, b = (json.loads((r / "summary.json").read_text()) for r in (whole, part))
    assert b["start"] == a["start"] and b["start"]["eer"]
    assert b["best_epoch"] == a["best_epoch"] and b["best"]["eer"] == a["best"]["eer"]
