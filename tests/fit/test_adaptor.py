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


def test_lda_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    classes, per, dim = 6, 40, 5
    means = 3 * rng.standard_normal((classes, dim))
    mix = rng.standard_normal((dim, dim))
    labels = np.repeat(np.arange(classes), per)
    x = means[labels] + rng.standard_normal((classes * per, dim)) @ mix
    mean, v = fit_lda(x, labels.astype(str))
    # Direct: scatter matrices by loops over classes, then the generalised eigenproblem.
    mu = x.mean(0)
    sw = sum((x[labels == c] - x[labels == c].mean(0)).T @ (x[labels == c] - x[labels == c].mean(0))
             for c in range(classes)) / len(x)
    sb = sum(per * np.outer(x[labels == c].mean(0) - mu, x[labels == c].mean(0) - mu) for c in range(classes)) / len(x)
    values, direct = scipy.linalg.eigh(sb, sw)
    direct = direct[:, ::-1]
    np.testing.assert_allclose(mean, mu, atol=1e-12)
    for k in range(dim):  # same directions up to sign, same scale (V^T Sw V = I)
        sign = np.sign(direct[:, k] @ v[:, k])
        np.testing.assert_allclose(v[:, k], sign * direct[:, k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(v.T @ sb @ v, np.diag(values[::-1]), rtol=1e-5, atol=1e-6)


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
    run = fit(tmp_path / "c", (4, 16, POOLED), tmp_path / "run", init="published", init_center=False,
              **{**FAST, "epochs": 3, "lr": 1.0, "warmup_epochs": 0})
    summary = json.loads((run / "summary.json").read_text())
    full = str(POOLED)
    assert summary["guard_dim"] == POOLED
    assert summary["best"]["eer"][full] <= summary["start"]["eer"][full]
    # Epoch 0 scores the imported vectors themselves at full size (an identity published map).
    model = load_model(run / "model.pt")
    if summary["best_epoch"] == -1:
        x = pooled[:, 0]
        torch.testing.assert_close(cosines(model.project(x, POOLED)), cosines(x), atol=2e-5, rtol=0)


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
