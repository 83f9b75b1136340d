"""Matryoshka head and losses: the vectorised loss against a plain per-dim loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from mrlcache import names
from mrlcache.models.matryoshka import MatryoshkaHead, check_dims
from mrlcache.fit.losses import MatryoshkaMarginLoss, sample_classes

DIMS = (8, 16, 24, 32)
CLASSES = 7


def loop_loss(loss_mod, emb, labels):
    """Reference: one classifier slice per dim, margin through acos, plain cross-entropy."""
    m, s, K = loss_mod.margin, loss_mod.scale, loss_mod.subcenters
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])[: len(DIMS)]
    totals, losses, accs = 0.0, [], []
    for i, d in enumerate(DIMS):
        weight = loss_mod.weight[:, :d] if loss_mod.classifier == "shared" else loss_mod.weights[i]
        cos = F.normalize(emb[:, :d], dim=1) @ F.normalize(weight, dim=1).T  # (B, C*K)
        cos = cos.view(len(emb), loss_mod.num_classes, K).max(dim=2).values
        logits = cos.clone()
        if loss_mod.kind == "aam":
            for b in range(len(emb)):
                c = cos[b, labels[b]]
                theta = torch.acos(c.clamp(-1, 1))
                if loss_mod.easy_margin:
                    logits[b, labels[b]] = torch.cos(theta + m) if c > 0 else c
                elif theta + m < math.pi:
                    logits[b, labels[b]] = torch.cos(theta + m)
                else:
                    logits[b, labels[b]] = c - m * math.sin(m)
        loss = F.cross_entropy(s * logits, labels)
        losses.append(loss)
        accs.append((cos.argmax(1) == labels).float().mean())
        totals = totals + w[i] / w.sum() * loss
    return totals, torch.stack(losses), torch.stack(accs)


@pytest.mark.parametrize("classifier", ["shared", "per-dim"])
@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("kind", names.LOSSES)  # every registered loss kind against its loop
def test_vectorised_loss_matches_loop(classifier, subcenters, kind):
    torch.manual_seed(0)
    loss_mod = MatryoshkaMarginLoss(
        DIMS, CLASSES, dim_weights=[1, 2, 3, 4], margin=0.3, scale=16,
        subcenters=subcenters, classifier=classifier, kind=kind,
    )
    emb = torch.randn(12, DIMS[-1], requires_grad=True)
    labels = torch.randint(0, CLASSES, (12,))
    total, dim_losses, dim_acc = loss_mod(emb, labels)
    total.backward()
    grads = [emb.grad.clone()] + [p.grad.clone() for p in loss_mod.parameters()]
    emb.grad = None
    loss_mod.zero_grad()

    ref_total, ref_losses, ref_acc = loop_loss(loss_mod, emb, labels)
    ref_total.backward()
    ref_grads = [emb.grad] + [p.grad for p in loss_mod.parameters()]

    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dim_losses, ref_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dim_acc, ref_acc)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("classifier, subcenters", [("shared", 1), ("shared", 2), ("per-dim", 2)])
def test_sampled_classes_match_the_loop_on_those_classes(classifier, subcenters):
    # The softmax over a subset of classes is the full loss of a classifier holding only
    # their rows; rows of classes left out get no gradient.
    torch.manual_seed(4)
    kw = dict(dim_weights=[1, 2, 3, 4], margin=0.3, scale=16, subcenters=subcenters, classifier=classifier)
    full = MatryoshkaMarginLoss(DIMS, CLASSES, **kw)
    kept = torch.tensor([0, 2, 3, 6])
    labels = torch.tensor([2, 6, 0, 2, 3, 6, 6, 0, 3])
    emb = torch.randn(len(labels), DIMS[-1], requires_grad=True)
    total, dim_losses, dim_acc = full(emb, labels, kept)
    total.backward()
    grad_emb, emb.grad = emb.grad.clone(), None

    rows = (kept[:, None] * subcenters + torch.arange(subcenters)).flatten()
    sub = MatryoshkaMarginLoss(DIMS, len(kept), **kw)
    with torch.no_grad():
        for p_sub, p_full in zip(sub.parameters(), full.parameters()):
            p_sub.copy_(p_full[rows])
    ref_total, ref_losses, ref_acc = loop_loss(sub, emb, torch.searchsorted(kept, labels))
    ref_total.backward()
    torch.testing.assert_close(dim_losses, ref_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dim_acc, ref_acc)
    torch.testing.assert_close(grad_emb, emb.grad, rtol=1e-4, atol=1e-6)
    left_out = torch.ones(CLASSES * subcenters, dtype=torch.bool)
    left_out[rows] = False
    for p_sub, p_full in zip(sub.parameters(), full.parameters()):
        torch.testing.assert_close(p_full.grad[rows], p_sub.grad, rtol=1e-4, atol=1e-6)
        assert p_full.grad[left_out].abs().max() == 0
    with pytest.raises(ValueError, match="include every label"):
        full(emb, labels, torch.tensor([0, 2, 3]))


def test_sample_classes_keeps_the_batch_classes_and_is_reproducible():
    labels = torch.tensor([5, 17, 5, 90, 42])
    draw = lambda seed, rate=0.1: sample_classes(labels, 100, rate, torch.Generator().manual_seed(seed))
    kept = draw(0)
    assert len(kept) == 10 and len(set(kept.tolist())) == 10
    assert torch.equal(kept, kept.sort().values)
    assert set(labels.tolist()) <= set(kept.tolist())
    assert torch.equal(draw(0), kept) and not torch.equal(draw(1), kept)
    assert torch.equal(draw(0, rate=0.02), torch.tensor([5, 17, 42, 90]))  # never fewer than the batch's
    assert torch.equal(draw(0, rate=1.0), torch.arange(100))
    # Over many draws every other class is drawn about equally often.
    counts = torch.zeros(100)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2000):
        counts[sample_classes(labels, 100, 0.1, gen)] += 1
    others = counts[[c for c in range(100) if c not in labels.tolist()]] / 2000
    assert (counts[labels] == 2000).all()
    assert abs(others.mean().item() - 6 / 96) < 1e-6 and others.min() > 0.04 and others.max() < 0.085  # 1/16 +- 4 sd


def test_margin_fallback_past_threshold_matches_loop():
    # Embeddings opposite to their class centre: theta + m > pi takes the fallback branch.
    torch.manual_seed(1)
    loss_mod = MatryoshkaMarginLoss(DIMS, CLASSES, dim_weights=[1, 2, 3, 4], margin=0.5, scale=8)
    labels = torch.arange(CLASSES)
    emb = -loss_mod.weight.detach()[labels] + 0.01 * torch.randn(CLASSES, DIMS[-1])
    total, dim_losses, _ = loss_mod(emb, labels)
    ref_total, ref_losses, _ = loop_loss(loss_mod, emb, labels)
    torch.testing.assert_close(dim_losses, ref_losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale, easy", [(64.0, False), (16.0, True)])
def test_large_scale_and_easy_margin_match_loop(scale, easy):
    # scale > 40 takes the row-max shift before exp; easy margin keeps cos where cos <= 0.
    torch.manual_seed(3)
    loss_mod = MatryoshkaMarginLoss(DIMS, CLASSES, dim_weights=[1, 2, 3, 4], margin=0.4, scale=scale,
                                    easy_margin=easy)
    emb = torch.randn(16, DIMS[-1], requires_grad=True)
    labels = torch.randint(0, CLASSES, (16,))
    _, dim_losses, _ = loss_mod(emb, labels)
    dim_losses.sum().backward()
    grad, emb.grad = emb.grad.clone(), None
    _, ref_losses, _ = loop_loss(loss_mod, emb, labels)
    ref_losses.sum().backward()
    torch.testing.assert_close(dim_losses, ref_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, emb.grad, rtol=1e-4, atol=1e-6)


def test_second_backward_is_refused():
    loss_mod = MatryoshkaMarginLoss(DIMS, CLASSES)
    total = loss_mod(torch.randn(6, DIMS[-1]), torch.arange(6))[0]
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        total.backward()


def test_margin_raises_loss_and_zero_margin_is_softmax():
    torch.manual_seed(2)
    emb, labels = torch.randn(10, 32), torch.randint(0, CLASSES, (10,))
    aam = MatryoshkaMarginLoss(DIMS, CLASSES, margin=0.2)
    soft = MatryoshkaMarginLoss(DIMS, CLASSES, kind="softmax")
    soft.load_state_dict(aam.state_dict())
    with_margin = aam(emb, labels)[1]
    aam.set_margin(0.0)
    torch.testing.assert_close(aam(emb, labels)[1], soft(emb, labels)[1])
    assert (with_margin > soft(emb, labels)[1]).all()


def test_per_dim_classifier_registers_one_weight_per_dim():
    loss_mod = MatryoshkaMarginLoss(DIMS, CLASSES, classifier="per-dim", subcenters=2)
    shapes = [tuple(p.shape) for p in loss_mod.parameters()]
    assert shapes == [(CLASSES * 2, d) for d in DIMS]
    assert sorted(loss_mod.state_dict()) == ["dim_weights"] + [f"weights.{i}" for i in range(4)]


def test_head_prefixes_and_dims_checks():
    head = MatryoshkaHead(40, DIMS).eval()
    x = torch.randn(5, 40)
    out = head(x)
    assert out.shape == (5, 32)
    torch.testing.assert_close(out, head.linear(head.bn(x)))
    with pytest.raises(ValueError, match="increasing"):
        check_dims([64, 32])
    with pytest.raises(ValueError, match="exceeds the pooled size"):
        MatryoshkaHead(16, DIMS)
    with pytest.raises(ValueError, match="dim_weights"):
        MatryoshkaMarginLoss(DIMS, CLASSES, dim_weights=[1, 1])
    with pytest.raises(ValueError, match="classifier"):
        MatryoshkaMarginLoss(DIMS, CLASSES, classifier="tied")
