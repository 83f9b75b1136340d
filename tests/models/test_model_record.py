"""The model record: every registered head rebuilt from what model.pt stores, and version 1 files converted."""

import numpy as np
import pytest
import torch
from conftest import tiny_head_args

from mrlcache import load_model
from mrlcache.models import HEADS, head_class, record
from mrlcache.models.matryoshka import MatryoshkaHead
from mrlcache.models.model import save_model
from mrlcache.models.streams import StreamModel, plan_groups
from mrlcache.streams import StreamRecord


class TinyOptions:
    """A fit's options, as tiny as a test wants them (every head reads its own)."""

    ecapa_channels, ecapa_scale, ecapa_mfa_channels, ecapa_bottleneck = 8, 2, 16, 4


FRAMES = {n: StreamRecord(n, "frames", shape, "float16", 100.0, ragged=True) for n, shape in (("fbank", (12,)),
                                                                                               ("f0", (2,)))}


def _inputs(head_cls, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) if head_cls.reads == "vector" else torch.randn(n, 6, 20, generator=g)


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_is_rebuilt_from_its_record_alone(name):
    cls = head_class(name)
    torch.manual_seed(0)
    head = cls(**tiny_head_args(name, [2, 4], width=6, options=TinyOptions())).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every tensor away from its initial value, so a lost one shows
        for t in [*head.parameters(), *(b for b in head.buffers() if b.is_floating_point())]:
            t.add_(0.1 * torch.rand(t.shape, generator=g))
    rec = record.record_of(head)
    assert rec == {"head": {"name": name, "args": head.args()}, "streams": None}
    again = record.build(rec).eval()
    again.load_state_dict(head.state_dict())
    x = _inputs(cls)
    with torch.no_grad():
        out = head(x)
        assert torch.equal(again(x), out) and out.shape[0] == 3 and out.shape[1] >= 4  # prefixes: the dims
        assert out.abs().sum() > 0


def _v1(head, streams_spec=None, inputs=("pooled",)) -> dict:
    """A model.pt dict as version 1 wrote it: dims and pooled_dim beside the head entry."""
    entry = ({"name": "mrl", "args": {"pooled_dim": head.pooled_dim, "dims": list(head.dims)}} if streams_spec is None
             else {"name": "streams", "args": streams_spec})
    return {"format": "mrlcache-model", "version": 1, "dims": list(head.dims), "pooled_dim": head.pooled_dim,
            "head_state": head.state_dict(), "backbone": None, "head": entry, "inputs": list(inputs)}


def test_version_1_files_load_as_they_did(tmp_path):
    torch.manual_seed(0)
    pooled = MatryoshkaHead(6, [2, 4]).eval()
    old = _v1(pooled)
    torch.save(old, tmp_path / "with_entry.pt")
    del old["head"], old["inputs"]  # the first files: no head entry at all
    torch.save(old, tmp_path / "first.pt")
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    with torch.no_grad():
        want = pooled(torch.from_numpy(x)).numpy()
    for name in ("with_entry.pt", "first.pt"):
        model = load_model(tmp_path / name)
        assert model.dims == (2, 4) and model.inputs == ("pooled",)
        np.testing.assert_array_equal(model.project(x), want)

    # A stream model: the v1 spec named the head and its arguments without the width.
    stream = StreamModel(plan_groups(["fbank", "f0"], FRAMES), "ecapa",
                         {"dims": [2, 4], "channels": 8, "scale": 2, "mfa_channels": 16,
                          "attention_bottleneck": 4, "se_bottleneck": 4}).eval()
    torch.save(_v1(stream, stream.spec(), ["fbank", "f0"]), tmp_path / "stream.pt")
    model = load_model(tmp_path / "stream.pt")
    batch = {"fbank": np.random.default_rng(1).standard_normal((2, 12, 20)).astype(np.float32),
             "f0": np.abs(np.random.default_rng(2).standard_normal((2, 2, 20))).astype(np.float32) + 1}
    with torch.no_grad():
        want = stream({k: torch.from_numpy(v) for k, v in batch.items()}).numpy()
    assert model.inputs == ("fbank", "f0") and model.dims == (2, 4)
    np.testing.assert_array_equal(model.project(batch), want)
    # Saved again, it is a version 2 file with the same record as a fresh save.
    again = torch.load(save_model(tmp_path / "again.pt", model.head), weights_only=True)
    assert again["version"] == 2 and {k: again[k] for k in ("head", "streams")} == record.record_of(stream)


def test_a_newer_version_is_refused_in_one_line(tmp_path):
    from mrlcache.models.model import ModelError

    head = MatryoshkaHead(6, [2, 4])
    obj = torch.load(save_model(tmp_path / "m.pt", head), weights_only=True)
    torch.save({**obj, "version": 3}, tmp_path / "future.pt")
    with pytest.raises(ModelError, match=r"model format version 3 \(this mrlcache reads 1, 2\)"):
        load_model(tmp_path / "future.pt")
