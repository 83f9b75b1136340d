"""The margin warm-up is a schedule: the loop steps it, it sets the loss's margin."""

import pytest

from mrlcache.fit.losses import MatryoshkaMarginLoss
from mrlcache.fit.optim import MarginWarmup


def test_margin_grows_linearly_then_holds():
    loss = MatryoshkaMarginLoss([4, 8], 5, margin=0.2)
    warm = MarginWarmup(loss, 0.2, epochs=4)
    got = [warm.step(e) for e in range(6)]
    assert got == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert loss.margin == pytest.approx(0.2) and warm.value == loss.margin


def test_per_dim_margins_warm_up_together_and_softmax_has_none():
    loss = MatryoshkaMarginLoss([4, 8], 5, margin=[0.1, 0.2])
    MarginWarmup(loss, 0.2, epochs=2).step(1)
    assert loss.margins == pytest.approx((0.05, 0.1))
    plain = MatryoshkaMarginLoss([4, 8], 5, kind="softmax")
    assert MarginWarmup(plain, 0.2, epochs=0).step(0) == 0.0  # no warm-up: full margin at once, none for softmax
