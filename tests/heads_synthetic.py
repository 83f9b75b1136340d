"""Builders for the head and fusion tests: a tiny separable two-stream problem and a trainer.

Each synthetic "speaker" is a latent vector mixed into two frame streams of different
widths and lengths; each utterance adds a strong nuisance vector (a "channel", 3x the
speaker's scale) through other directions, plus frame noise. The mixing matrices are the
same for every speaker (they are the "physics"), so a head that learns to ignore the
nuisance directions on training speakers also separates unseen speakers, while the raw
cosine on the time-averaged streams is dominated by the nuisance.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from mrlcache.fit.losses import MatryoshkaMarginLoss
from mrlcache.metrics import eer

WIDTHS, LENGTHS = (10, 6), (24, 22)


def make_problem(speakers: int, utts: int, seed: int, latent: int = 4, nuisance: int = 3):
    """-> (streams [(N, 10, 24), (N, 6, 22)], labels (N,)); mixing fixed, speakers by seed."""
    mix = torch.Generator().manual_seed(1234)
    spk_mix = [torch.randn(w, latent, generator=mix) for w in WIDTHS]
    nui_mix = [torch.randn(w, nuisance, generator=mix) for w in WIDTHS]
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(speakers, latent, generator=g)
    labels = torch.arange(speakers).repeat_interleave(utts)
    n = 3.0 * torch.randn(len(labels), nuisance, generator=g)
    streams = []
    for a, b, t in zip(spk_mix, nui_mix, LENGTHS):
        base = s[labels] @ a.T + n @ b.T  # (N, D)
        streams.append(base[:, :, None] + 0.5 * torch.randn(len(labels), a.shape[0], t, generator=g))
    return streams, labels


def cosine_eer(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """EER of cosine scores over every pair of rows."""
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    i, j = map(np.array, zip(*itertools.combinations(range(len(labels)), 2)))
    scores = (e[i] * e[j]).sum(1).numpy()
    return eer(scores, (labels[i] == labels[j]).numpy().astype(int))[0]


def raw_eer(streams, labels) -> float:
    """The baseline: cosine on the concatenated time-averaged streams."""
    return cosine_eer(torch.cat([x.mean(dim=2) for x in streams], dim=1), labels)


def train(model: nn.Module, streams, labels, dims, steps: int = 100, batch: int = 48, lr: float = 3e-3):
    """AAM-softmax (m 0.2, s 30) over the nested dims with Adam; returns the loss per step."""
    torch.manual_seed(0)
    loss_fn = MatryoshkaMarginLoss(dims, int(labels.max()) + 1, margin=0.2, scale=30.0)
    opt = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=lr)
    g = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(labels), (batch,), generator=g)
        loss, _, _ = loss_fn(model([x[idx] for x in streams]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def check_learns(model: nn.Module, dims, steps: int = 100, ratio: float = 0.6):
    """Train on 32 speakers, test on 8 unseen ones: the loss falls and the EER beats raw cosine."""
    streams, labels = make_problem(32, 8, seed=0)
    losses = train(model, streams, labels, dims, steps=steps)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    test, test_labels = make_problem(8, 8, seed=99)
    with torch.no_grad():
        emb = model(test)
    assert emb.shape == (64, dims[-1])
    learned, raw = cosine_eer(emb, test_labels), raw_eer(test, test_labels)
    # Measured (seeded): fusions + pooled head 0.10-0.16, ECAPA 0.19, gating + ECAPA 0.27, raw 0.40.
    assert learned < ratio * raw, (learned, raw)
    return learned, raw
