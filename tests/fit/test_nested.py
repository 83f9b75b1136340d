"""Nested-dim options of a fit: per-dim margins, gradient scaling, fixed-size baselines, small dims."""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_fit import FAST, write_synth_cache

from mrlcache.fit import FitError, fit
from mrlcache.fit.config import make_configs
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.fit.losses import MatryoshkaMarginLoss

DIMS = (8, 16, 24, 32)
MARGINS = (0.1, 0.15, 0.2, 0.3)
CLASSES = 7


def reference_losses(loss_mod, emb, labels, margins):
    """Plain loop: per dim, its classifier slice, ArcFace through acos with that dim's margin."""
    s = loss_mod.scale
    out = []
    for i, d in enumerate(DIMS):
        weight = loss_mod.weight[:, :d] if loss_mod.classifier == "shared" else loss_mod.weights[i]
        cos = F.normalize(emb[:, :d], dim=1) @ F.normalize(weight, dim=1).T  # (B, C)
        logits = cos.clone()
        m = margins[i]
        for b in range(len(emb)):
            c = cos[b, labels[b]]
            theta = torch.acos(c.clamp(-1, 1))
            logits[b, labels[b]] = torch.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)
        out.append(F.cross_entropy(s * logits, labels))
    return torch.stack(out)  # (S,)


@pytest.mark.parametrize("classifier", ["shared", "per-dim"])
def test_per_dim_margins_match_the_loop(classifier):
    torch.manual_seed(0)
    loss_mod = MatryoshkaMarginLoss(DIMS, CLASSES, margin=MARGINS, scale=16, classifier=classifier)
    emb = torch.randn(12, DIMS[-1], requires_grad=True)
    labels = torch.randint(0, CLASSES, (12,))
    for warm in (1.0, 0.5):  # the fit warms the largest margin up; the others keep their ratio
        loss_mod.set_margin(max(MARGINS) * warm)
        margins = [m * warm for m in MARGINS]
        _, dim_losses, _ = loss_mod(emb, labels)
        dim_losses.sum().backward()
        grad, emb.grad = emb.grad.clone(), None
        ref = reference_losses(loss_mod, emb, labels, margins)
        ref.sum().backward()
        torch.testing.assert_close(dim_losses, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, emb.grad, rtol=1e-4, atol=1e-6)
        emb.grad = None
        assert loss_mod.margin == pytest.approx(0.3 * warm)
        assert loss_mod.margins == pytest.approx(margins)
    # Equal margins given per dim are the single margin.
    one = MatryoshkaMarginLoss(DIMS, CLASSES, margin=0.2, scale=16, classifier=classifier)
    many = MatryoshkaMarginLoss(DIMS, CLASSES, margin=[0.2] * 4, scale=16, classifier=classifier)
    many.load_state_dict(one.state_dict())
    torch.testing.assert_close(one(emb, labels)[1], many(emb, labels)[1])


@pytest.mark.parametrize("classifier", ["shared", "per-dim"])
def test_grad_scaling_matches_the_reference(classifier):
    torch.manual_seed(1)
    weights = [1.0, 2.0, 3.0, 4.0]
    kw = dict(dim_weights=weights, margin=0.2, scale=16, classifier=classifier)
    scaled = MatryoshkaMarginLoss(DIMS, CLASSES, grad_scaling=True, **kw)
    plain = MatryoshkaMarginLoss(DIMS, CLASSES, **kw)
    plain.load_state_dict(scaled.state_dict())
    head = MatryoshkaHead(40, DIMS)
    x, labels = torch.randn(10, 40), torch.randint(0, CLASSES, (10,))

    emb = head(x)
    emb.retain_grad()
    total, _, _ = scaled(emb, labels)
    total.backward()
    got_emb, got_lin = emb.grad.clone(), head.linear.weight.grad.clone()
    got_cls = [p.grad.clone() for p in scaled.parameters()]

    # Reference: each dim's loss differentiated alone, weighted, summed; then coordinate j
    # divided by the number of dims longer than j, counted here coordinate by coordinate.
    e = emb.detach().requires_grad_(True)
    ref = torch.zeros_like(e)
    losses = reference_losses(plain, e, labels, [0.2] * 4)
    for i, loss in enumerate(losses):
        (g,) = torch.autograd.grad(weights[i] / sum(weights) * loss, e, retain_graph=True)
        ref += g
    counts = torch.tensor([float(sum(1 for d in DIMS if j < d)) for j in range(DIMS[-1])])
    ref /= counts
    torch.testing.assert_close(got_emb, ref, rtol=1e-4, atol=1e-7)
    # The projection's rows get the scaled coordinate gradients; the classifier is untouched.
    torch.testing.assert_close(got_lin, ref.T @ head.bn(x).detach(), rtol=1e-4, atol=1e-6)
    head.zero_grad()
    plain(head(x), labels)[0].backward()
    assert counts[0] == 4 and counts[-1] == 1
    torch.testing.assert_close(got_lin[:8], head.linear.weight.grad[:8] / 4, rtol=1e-4, atol=1e-7)
    for g, p in zip(got_cls, plain.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("options, message", [
    (dict(margins=(0.1, 0.2)), "one margin per dim"),
    (dict(margins=(0.1, -0.1, 0.2, 0.2)), "each value must be a finite number >= 0"),
    (dict(margins=(0.1, 0.1, 0.2, 0.2), margin=0.35), "give one of them"),
])
def test_bad_margins_are_refused(options, message):
    with pytest.raises(FitError, match=message):
        make_configs(DIMS, options)
    with pytest.raises(ValueError, match="values >= 0"):
        MatryoshkaMarginLoss(DIMS, CLASSES, margin=(0.1, 0.2))


def test_margins_set_the_margin_and_fixed_baselines_need_a_cache():
    cfg, _ = make_configs(DIMS, {"margins": (0.1, 0.15, 0.2, 0.25)})
    assert cfg.loss.margin == 0.25 and cfg.to_dict()["loss"]["margins"] == [0.1, 0.15, 0.2, 0.25]
    with pytest.raises(FitError, match="--fixed-baselines trains on a cache"):
        make_configs(DIMS, {"fixed_baselines": True, "variant": "b0"}, end_to_end=True)


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("nested")
    write_synth_cache(root / "train", n_spk=40, utts=6, views=2, seed=1)
    return root / "train"


OPTS = dict(FAST, epochs=4, val_speakers=8)


def _state(path):
    return torch.load(path, weights_only=True)["head_state"]


def test_fixed_baselines_are_the_separate_fits(train_cache, tmp_path):
    dims = (4, 8, 16)
    run = fit(train_cache, dims, tmp_path / "run", fixed_baselines=True, margins=(0.1, 0.15, 0.2), **OPTS)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["run"]["fixed_baselines"] is True and config["loss"]["margins"] == [0.1, 0.15, 0.2]
    # Each fixed head is exactly what a --dims D fit with that dim's margin gives.
    for d, m in zip(dims, (0.1, 0.15, 0.2)):
        fixed = yaml.safe_load((run / "fixed" / str(d) / "config.yaml").read_text())
        assert fixed["head"]["dims"] == [d] and fixed["loss"]["margin"] == m and fixed["run"]["fixed_baselines"] is False
        alone = fit(train_cache, (d,), tmp_path / f"alone{d}", margin=m, **OPTS)
        a, b = _state(run / "fixed" / str(d) / "model.pt"), _state(alone / "model.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), d
    # ...and the Matryoshka head is the one a fit without baselines gives.
    plain = fit(train_cache, dims, tmp_path / "plain", margins=(0.1, 0.15, 0.2), **OPTS)
    a, b = _state(run / "model.pt"), _state(plain / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_small_dims_fit_with_both_options(train_cache, tmp_path):
    dims = (2, 4, 8, 16, 32)
    run = fit(train_cache, dims, tmp_path / "run", margins=(0.05, 0.1, 0.15, 0.2, 0.2), grad_scaling=True, **OPTS)
    assert list(torch.load(run / "model.pt", weights_only=True)["head"]["args"]["dims"]) == list(dims)
    hist = [yaml.safe_load(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert set(hist[-1]["val_eer"]) == {str(d) for d in dims}
    assert hist[0]["margin"] == 0 and hist[-1]["margin"] == pytest.approx(0.2)  # warmed up


@pytest.mark.parametrize("change, name", [({"grad_scaling": True}, "grad_scaling"),
                                          ({"margins": (0.1, 0.1, 0.2)}, "margins"),
                                          ({"fixed_baselines": True}, "fixed_baselines")])
def test_resume_refuses_a_changed_nested_option(train_cache, tmp_path, change, name):
    run = fit(train_cache, (4, 8, 16), tmp_path / "run", **{**OPTS, "epochs": 1})
    with pytest.raises(FitError, match=f"options differ.*{name}"):
        fit(train_cache, (4, 8, 16), run, resume=True, **{**OPTS, "epochs": 2, **change})
