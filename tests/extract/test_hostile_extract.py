"""Hostile extract reruns: a source replaced by other audio is refused by name, a copy is not."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import TINY, make_tree, speech_like, write_wav

from mrlcache.backbone import state_sha256
from mrlcache.backbone.redimnet import ReDimNet
from mrlcache.corpus import scan_tree
from mrlcache.extract import ExtractConfig, ExtractError, extract


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    model = ReDimNet(TINY).eval()
    model.weights_sha256 = state_sha256(model)
    return model


def test_a_replaced_source_is_refused_and_a_copied_one_is_not(tmp_path, backbone):
    data = tmp_path / "data"
    make_tree(data, speakers=2, videos=1, utts=2, seconds=0.5)
    cfg = ExtractConfig.of(mode="eval", dtype="float32", shard_size=2, device="cpu", workers=0)
    utts = scan_tree(data)
    extract(utts, backbone, tmp_path / "cache", cfg, progress=False)
    # Moved to another disk: new paths and modification times, same bytes -> accepted.
    shutil.copytree(data, tmp_path / "moved")
    for p in (tmp_path / "moved").rglob("*.wav"):
        os.utime(p, ns=(1, 1))
    extract(scan_tree(tmp_path / "moved"), backbone, tmp_path / "cache", cfg, progress=False)
    # Replaced by other audio of exactly the same length (so the same size) -> refused by name.
    victim = utts[1].path
    size = os.path.getsize(victim)
    write_wav(victim, speech_like(0.5, seed=99, f0=200.0), 16000)
    assert os.path.getsize(victim) == size
    with pytest.raises(ExtractError, match=rf"{victim}: changed since its vectors were extracted .*--overwrite"):
        extract(utts, backbone, tmp_path / "cache", cfg, progress=False)
    extract(utts, backbone, tmp_path / "cache", cfg, progress=False, overwrite=True)  # the fix works


def test_a_decoding_worker_killed_mid_extract_is_one_line(tmp_path, backbone, monkeypatch):
    import signal

    from mrlcache.extract import data

    make_tree(tmp_path / "data", speakers=2, videos=1, utts=2, seconds=0.5)
    real = data.UtteranceViews.__getitem__

    def killed(self, row):  # as the out-of-memory killer would, on the third file
        if row == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, row)

    monkeypatch.setattr(data.UtteranceViews, "__getitem__", killed)
    cfg = ExtractConfig.of(mode="eval", dtype="float32", shard_size=2, device="cpu", workers=1)
    with pytest.raises(ExtractError, match=r"DataLoader worker \(pid.*\) (is killed by signal|exited unexpectedly).*rerun the same "
                                           r"command to resume"):
        extract(scan_tree(tmp_path / "data"), backbone, tmp_path / "cache", cfg, progress=False)
    monkeypatch.setattr(data.UtteranceViews, "__getitem__", real)
    extract(scan_tree(tmp_path / "data"), backbone, tmp_path / "cache", cfg, progress=False)  # resumes
